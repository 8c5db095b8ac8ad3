"""One round's client side: sample, build jobs, run them on the pool, clock them, cut stragglers.

Kept apart from ``driver.py`` (which adds the model, the server epoch, evaluation, MLflow and
checkpoints) so that the benchmark and the scale tests run exactly this code with a no-op client.

Memory. Nothing here is sized by the number of clients N: a client's shard comes from the
partition index (``ShardIndex``), its profile from a round-robin rule (``ProfileAssignment``),
its seed from ``derive_seed``. A round holds its own jobs and results (O(clients per round)) and
drops them when it ends. Client ids at or beyond the partition's shards reuse shard
``id % #shards`` (and that shard's domain), so N = 1000 virtual clients need not render 1000
shards of images; a ``work: noop`` client never opens its shard at all.

Availability. With ``clients.availability < 1`` each round first draws its online clients
(``online_clients``, from (seed, round)) and samples among them only.

Determinism. The sample is drawn from ``default_rng([seed, round])``: the strategy picks its
``m`` clients, over-selection then adds ``ceil(m * over_selection) - m`` more from the same
generator. Job seeds depend on (seed, round, client) only; the clock uses work measures, not
wall time (``clock.py``); the kept results are sorted by client id. So results do not depend
on how many actors there are or in which order they finish.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedsim.runtime.clock import JobTime, first_to_finish, job_time
from fedsim.runtime.pool import ClientPool
from fedsim.runtime.resources import ProfileAssignment
from fedsim.runtime.server import derive_seed
from fedsim.train.pseudo_quality import QualityCounts
from fedsim.types import ClientFailure, ClientJob, ClientResult, State


class TooFewClients(RuntimeError):
    """A round in which fewer than ``clients.min_clients`` results arrived in time."""


@dataclass(frozen=True)
class Shard:
    images: str
    domain: str
    num_images: int


class ShardIndex(Mapping):
    """Client id -> shard, modulo the shards the partition has (also usable as id -> domain)."""

    def __init__(self, shards: list[Shard]):
        if not shards:
            raise ValueError("the partition has no client shards")
        self.shards = shards

    @classmethod
    def from_partition(cls, partition, with_labels: bool = False) -> ShardIndex:
        """The clients' shards; ``with_labels``: their labeled views instead (images + true labels), which
        only the pseudo-label diagnostics read, never the training."""
        ordered = sorted(partition.clients, key=lambda c: c.client_id)
        paths = [partition.labeled_client_view(c.client_id) if with_labels else c.images for c in ordered]
        return cls([Shard(str(p), c.domain, c.num_images) for p, c in zip(paths, ordered, strict=True)])

    def shard(self, client_id: int) -> Shard:
        return self.shards[client_id % len(self.shards)]

    # Mapping[int, str]: the client's domain, which is what strategies' round_metrics look up.
    def __getitem__(self, client_id: int) -> str:
        return self.shard(int(client_id)).domain

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.shards)))

    def __len__(self) -> int:
        return len(self.shards)


@dataclass
class RoundOutcome:
    rnd: int
    wanted: int  # m: results the round aggregates at most
    jobs: list[ClientJob]
    kept: list[ClientResult]  # aggregated, by client id
    stragglers: list[ClientResult]
    failures: list[ClientFailure]
    times: dict[int, JobTime]  # simulated, per finished client
    round_sim_s: float

    def release_updates(self) -> None:
        """Drop the clients' states once aggregated (the object store can then reuse their pages)."""
        for r in self.kept + self.stragglers:
            r.update, r.payload, r.residual = {}, None, None


def over_selected(wanted: int, factor: float, num_clients: int) -> int:
    """Clients to sample so that ``wanted`` can be aggregated: ``ceil(wanted * factor)``, at most N."""
    return min(num_clients, math.ceil(wanted * factor - 1e-9))  # 10 * 1.3 is 13.000000000000002


def jobs_per_round(clients: Any) -> int:
    """Client jobs one round starts: the clients it aggregates plus the over-selected extras."""
    return over_selected(clients.per_round, clients.over_selection, clients.num_clients)


# Seeds the online draws apart from the sample's generator: availability 1.0 samples as before.
ONLINE_STREAM = 7
MAX_ONLINE_DRAWS = 1000


def online_clients(seed: int, rnd: int, num_clients: int, availability: float, need: int) -> list[int]:
    """Round ``rnd``'s online clients: each with probability ``availability``, from (seed, round).

    While fewer than ``need`` are online the set is drawn again (a later moment of the round's wait
    on the virtual clock, not charged), from (seed, round, attempt); O(N) per round.
    """
    for attempt in range(MAX_ONLINE_DRAWS):
        draw = np.random.default_rng([seed, rnd, ONLINE_STREAM, attempt]).random(num_clients)
        online = np.flatnonzero(draw < availability)
        if len(online) >= need:
            return [int(x) for x in online]
    raise TooFewClients(
        f"round {rnd}: fewer than clients.min_clients={need} of {num_clients} clients online in "
        f"{MAX_ONLINE_DRAWS} draws at clients.availability={availability}"
    )


def sample_clients(strategy: Any, cfg: Any, rnd: int) -> tuple[list[int], int]:
    """(selected client ids, m): the strategy's m clients plus the over-selected extras, sorted.

    With ``clients.availability < 1`` the m clients (and the extras) are drawn uniformly among the
    round's online clients instead (all of them when fewer are online than m).
    """
    c = cfg.clients
    rng = np.random.default_rng([cfg.seed, rnd])
    if c.availability < 1.0:
        return _sample_online(cfg, rnd, rng)
    primary = [int(x) for x in strategy.sample_clients(rnd, c.num_clients, rng)]
    wanted = len(primary)
    extra = over_selected(wanted, c.over_selection, c.num_clients) - wanted
    taken = set(primary)
    if extra > 0 and wanted + extra > c.num_clients // 2:
        rest = np.array([i for i in range(c.num_clients) if i not in taken])
        taken.update(int(x) for x in rng.choice(rest, size=extra, replace=False))
    else:
        while len(taken) < wanted + extra:  # rejection keeps memory O(selected), not O(N)
            taken.add(int(rng.integers(c.num_clients)))
    return sorted(taken), wanted


def _sample_online(cfg: Any, rnd: int, rng: np.random.Generator) -> tuple[list[int], int]:
    c = cfg.clients
    online = online_clients(cfg.seed, rnd, c.num_clients, c.availability, c.min_clients)
    wanted = min(c.per_round, len(online))
    size = min(len(online), over_selected(wanted, c.over_selection, c.num_clients))
    picked = rng.choice(len(online), size=size, replace=False)
    return sorted(online[int(i)] for i in picked), wanted


class ClientPhase:
    """``residual_of``: a client's top-k residual to send with its job (``uplink.Uplink``), if any."""

    def __init__(
        self,
        cfg: Any,
        strategy: Any,
        shards: ShardIndex,
        imgsz: int,
        pool: ClientPool,
        residual_of: Callable[[int], State | None] | None = None,
    ):
        self.cfg = cfg
        self.strategy = strategy
        self.shards = shards
        self.imgsz = imgsz
        self.pool = pool
        self.profiles = ProfileAssignment.from_config(cfg.clients)
        self.residual_of = residual_of

    def jobs(self, rnd: int, selected: list[int]) -> list[ClientJob]:
        plan = self.strategy.client_plan(rnd) if self.cfg.clients.work == "train" else None
        out = []
        for cid in selected:
            profile = self.profiles.of(cid)
            out.append(
                ClientJob(
                    cid,
                    rnd,
                    self.shards.shard(cid).images,
                    self.imgsz,
                    derive_seed(self.cfg.seed, rnd, cid, 3),
                    plan,
                    threads=profile.threads,
                    budget_mib=profile.budget_mib,
                    residual=self.residual_of(cid) if self.residual_of else None,
                )
            )
        return out

    def run(self, rnd: int, state: State) -> RoundOutcome:
        c = self.cfg.clients
        selected, wanted = sample_clients(self.strategy, self.cfg, rnd)
        jobs = self.jobs(rnd, selected)
        state_ref = ray.put(state)
        outcomes = self.pool.run(jobs, state_ref)
        del state_ref
        results = [o for o in outcomes if isinstance(o, ClientResult)]
        failures = sorted((o for o in outcomes if isinstance(o, ClientFailure)), key=lambda f: f.client_id)
        times = {
            r.client_id: job_time(
                self.profiles.of(r.client_id),
                r.telemetry.work_images,
                self.imgsz,
                r.telemetry.bytes_down,
                r.telemetry.bytes_up,
                c.image_cost_s,
            )
            for r in results
        }
        cut = first_to_finish(results, {k: t.total_s for k, t in times.items()}, wanted, c.deadline_s)
        for r in cut.stragglers:
            r.update, r.payload, r.residual = {}, None, None  # never aggregated: free them now
        return RoundOutcome(rnd, wanted, jobs, cut.kept, cut.stragglers, failures, times, cut.round_sim_s)


def check_quorum(outcome: RoundOutcome, min_clients: int) -> None:
    if len(outcome.kept) < min_clients:
        raise TooFewClients(
            f"round {outcome.rnd}: only {len(outcome.kept)} of {len(outcome.jobs)} clients answered, "
            f"below clients.min_clients={min_clients}"
        )


def _mean(results: list[ClientResult], key: str) -> float:
    values = [r.metrics[key] for r in results if key in r.metrics]
    return float(np.mean(values)) if values else 0.0


def _mean_seconds(results: list[ClientResult]) -> float:
    return float(np.mean([r.telemetry.seconds for r in results])) if results else 0.0


def pseudo_label_metrics(results: list[ClientResult], domains: Mapping[int, str]) -> dict[str, float]:
    """Pseudo-label precision, recall and mean IoU per client domain, pooled over the round's clients."""
    pooled: dict[str, QualityCounts] = {}
    for r in results:
        if "pseudo_tp" in r.metrics:
            counts = QualityCounts.from_dict(
                {k[len("pseudo_") :]: v for k, v in r.metrics.items() if k.startswith("pseudo_")}
            )
            pooled[domains[r.client_id]] = pooled.get(domains[r.client_id], QualityCounts()) + counts
    out = {}
    for domain, q in pooled.items():
        out.update({f"pseudo/precision/{domain}": q.precision, f"pseudo/recall/{domain}": q.recall})
        out[f"pseudo/iou/{domain}"] = q.mean_iou
    return out


def class_threshold_metrics(results: list[ClientResult], names: list[str]) -> dict[str, float]:
    """``pseudo/class_thres/<class>``: the adaptive thresholds the round's clients ended their jobs
    with, averaged over them (nothing when thresholds are fixed)."""
    out = {}
    for c, name in enumerate(names):
        values = [r.metrics[f"class_thres_{c}"] for r in results if f"class_thres_{c}" in r.metrics]
        if values:
            out[f"pseudo/class_thres/{name}"] = float(np.mean(values))
    return out


def round_metrics(outcome: RoundOutcome, state_bytes: int) -> dict[str, float]:
    """The round's client figures for MLflow: a fixed set of keys whatever N is."""
    kept, finished = outcome.kept, outcome.kept + outcome.stragglers
    return {
        "clients/selected": len(outcome.jobs),
        "clients/ok": len(kept),
        "clients/failed": len(outcome.failures),
        "clients/stragglers": len(outcome.stragglers),
        "client/box_loss": _mean(kept, "box_loss"),
        "client/cls_loss": _mean(kept, "cls_loss"),
        "client/n_pseudo": sum(r.metrics.get("n_pseudo", 0) for r in kept),
        "client/peak_mem_mib": max((r.telemetry.peak_mem_mib for r in finished), default=0),
        "client/seconds": _mean_seconds(kept),
        "bytes_up": sum(r.telemetry.bytes_up for r in kept),
        "bytes_down": state_bytes * len(outcome.jobs),
        "round_sim_seconds": outcome.round_sim_s,
    }


CLIENT_COLUMNS = [
    "client_id",
    "profile",
    "status",
    "sim_seconds",
    "down_s",
    "compute_s",
    "up_s",
    "wall_seconds",
    "peak_mem_mib",
    "num_samples",
    "node",
    "error",
]


def client_rows(outcome: RoundOutcome, profiles: ProfileAssignment) -> list[dict[str, Any]]:
    """One row per selected client: its profile, fate, simulated times and measured peak memory."""
    status = {r.client_id: ("ok", r) for r in outcome.kept}
    status.update({r.client_id: ("straggler", r) for r in outcome.stragglers})
    errors = {f.client_id: f.error.splitlines()[0] if f.error else "" for f in outcome.failures}
    failed_on = {f.client_id: f.node for f in outcome.failures}
    rows = []
    for job in outcome.jobs:
        cid = job.client_id
        state, result = status.get(cid, ("failed", None))
        t = outcome.times.get(cid)
        tel = result.telemetry if result else None
        rows.append(
            {
                "client_id": cid,
                "profile": profiles.name_of(cid),
                "status": state,
                "sim_seconds": round(t.total_s, 6) if t else "",
                "down_s": round(t.down_s, 6) if t else "",
                "compute_s": round(t.compute_s, 6) if t else "",
                "up_s": round(t.up_s, 6) if t else "",
                "wall_seconds": round(tel.seconds, 4) if tel else "",
                "peak_mem_mib": round(tel.peak_mem_mib, 1) if tel else "",
                "num_samples": result.num_samples if result else "",
                "node": tel.node if tel else failed_on.get(cid, ""),
                "error": errors.get(cid, ""),
            }
        )
    return rows


def write_client_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
