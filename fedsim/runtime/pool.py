"""A fixed pool of long-lived client actors, fed one round's jobs at a time (Flower's actor pool).

Actors are created once per run; a round submits its jobs and collects them in whatever order
they finish (the caller sorts). The global state is ``ray.put`` once per round and every job
gets the same reference.

Failures. A client that raises becomes a ``ClientFailure`` inside the actor (``client.py``). An
actor that dies (killed, OOM-killed by Ray's memory monitor) makes ``ray.get`` raise
``RayActorError``: the pool has already dropped it, a fresh actor takes its place for the jobs
still queued, and the job it was running becomes a ``ClientFailure("client actor died: ...")``.
That job is **not retried**. The job is idempotent (global state + seed), so a retry would be
safe, but a device that drops out mid-round is exactly what the simulator should model; the
FL answer to dropouts is over-selection (``clients.over_selection``) and a quorum
(``clients.min_clients``), not a second chance the real device would not get.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.util import ActorPool

from fedsim.types import ClientFailure, ClientJob, ClientResult

Outcome = ClientResult | ClientFailure


class ClientPool:
    """``slots``: where each actor goes, a node id (``nodes.place_pool``) or None (Ray decides)."""

    def __init__(self, new_actor: Callable[[str | None], Any], slots: list[str | None]):
        self._new_actor = new_actor
        self._actors = [new_actor(node) for node in slots]
        ray.get([a.ready.remote() for a in self._actors])
        self._pool = ActorPool(list(self._actors))
        self.size = len(slots)
        self.replaced = 0  # actors that died and were replaced, over the run

    def run(self, jobs: list[ClientJob], state_ref: ray.ObjectRef) -> list[Outcome]:
        """Every job's outcome, one per job, in completion order."""
        for job in jobs:
            self._pool.submit(lambda actor, job: actor.run.remote(job, state_ref), job)
        outcomes: list[Outcome] = []
        died: list[str] = []
        while self._pool.has_next():
            try:
                outcomes.append(self._pool.get_next_unordered())
            except ray.exceptions.RayActorError as exc:
                # ActorPool keeps a dead actor out of its idle set; a fresh one takes its place
                # wherever there is room (its node may be the one that went away).
                died.append(str(exc).splitlines()[0])
                fresh = self._new_actor(None)
                self._actors.append(fresh)
                self._pool.push(fresh)
                self.replaced += 1
        answered = {o.client_id for o in outcomes}
        reason = died[0] if died else "unknown"
        outcomes += [
            ClientFailure(j.client_id, j.round, f"client actor died: {reason}")
            for j in jobs
            if j.client_id not in answered
        ]
        return outcomes

    def close(self) -> None:
        """Kill the actors (their resources return to the cluster at once)."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
