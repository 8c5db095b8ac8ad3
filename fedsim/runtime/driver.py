"""The round loop: warm-up, then sample -> clients -> aggregate -> server epoch -> evaluate -> log -> checkpoint.

``Simulation`` is the loop; ``DriverActor`` runs it inside Ray and streams one progress record per
round back to whoever started it. Every finished round is in MLflow and in a checkpoint before
the next one starts, so ``--resume`` continues from the last one with identical results.

The client side of a round (sampling with over-selection, the actor pool, the virtual clock and
the straggler cut) is ``rounds.ClientPhase``. Per round MLflow gets a fixed set of client figures
(``clients/ok|failed|stragglers|selected``, ``round_sim_seconds`` beside ``round_seconds``, the wall
seconds of each phase as ``phase_seconds/clients|aggregate|server|eval|record``) and one
artifact table, ``clients/round_NNNN.csv``, with a row per selected client (profile, fate,
simulated and wall seconds, peak memory): per-client metric keys would be N x rounds series at
N = 1000. A round with fewer than ``clients.min_clients`` usable results ends the run with
``TooFewClients`` after the previous round's checkpoint, leaving the MLflow run FAILED; ``--resume``
continues from that checkpoint.

Between the client phase and ``strategy.aggregate`` the driver decodes compressed updates and files
top-k residuals (``uplink.py``), and with ``privacy.clip_norm`` set it aggregates through
``private.PrivateAggregate`` (clipping, noise, ``privacy/epsilon``) instead of calling the strategy
directly. The server's own epoch is never noised (see ``fedsim/privacy.py`` for the threat model).

A strategy's answers are applied here, the same way on every path: ``init_weights`` once on a new
run (it changes only checkpointed state), ``server_plan(rnd)`` before every warm-up and server
epoch, new or resumed. After each round the callbacks run (``callbacks.py``): MLflow, then the
checkpoint, then whatever the caller added (a sweep's Tune report).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
import torch

from fedsim.config import ExperimentConfig
from fedsim.data.partition import Partition
from fedsim.model.detector import build_detector, get_state, model_spec, set_state, state_nbytes
from fedsim.privacy import enabled as privacy_enabled
from fedsim.runtime.callbacks import Callback, Checkpointer, MlflowLogger, latest_checkpoint, load_checkpoint
from fedsim.runtime.client import ClientActor
from fedsim.runtime.drift import round_drift
from fedsim.runtime.nodes import free_per_node, on_node
from fedsim.runtime.pool import ClientPool
from fedsim.runtime.private import PrivateAggregate
from fedsim.runtime.resources import ProfileAssignment, actor_options, place_pool
from fedsim.runtime.rounds import (
    ClientPhase,
    ShardIndex,
    TooFewClients,
    check_quorum,
    class_threshold_metrics,
    client_rows,
    jobs_per_round,
    pseudo_label_metrics,
    round_metrics,
    write_client_rows,
)
from fedsim.runtime.server import ServerTrainer
from fedsim.runtime.uplink import Uplink
from fedsim.tracking import Tracker, git_commit, platform_stamp
from fedsim.types import ClientResult, State
from strategies import build as build_strategy


def weights_fingerprint(path: str | None) -> str:
    """``<file name>:<sha1 of its bytes, 12 hex>`` of the checkpoint a run started from (``none``)."""
    if not path:
        return "none"
    digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]
    return f"{Path(path).name}:{digest}"


class Simulation:
    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        partition_root: Path,
        weights: str | None,
        tracking_uri: str,
        resume: bool = False,
        extra_tags: dict[str, str] | None = None,
        pool_size: int | None = None,
        stop_after: int | None = None,
        callbacks: list[Callback] | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        torch.set_num_threads(cfg.train.server_threads)
        torch.manual_seed(cfg.seed)
        self.partition = Partition.load(Path(partition_root))
        self.strategy = build_strategy(cfg)
        detector = build_detector(cfg.model.arch, cfg.data.classes, weights, trust=cfg.model.trust_checkpoint)
        self.weights_tag = weights_fingerprint(weights)
        self.model = self.strategy.build_model(detector)
        self.server = ServerTrainer(self.model, self.partition, cfg)
        self.tracking_uri = tracking_uri
        self.history: list[dict[str, float]] = []
        self.extra_tags = extra_tags or {}
        self.fixed_pool_size = pool_size  # e.g. a Tune trial that reserved its bundles
        self.stop_after = stop_after  # end early, as a killed run would, leaving the MLflow run unfinished
        self.callbacks: list[Callback] = [MlflowLogger(), Checkpointer(cfg.tracking.keep_checkpoints)]
        self.callbacks += callbacks or []
        self.shards = ShardIndex.from_partition(self.partition, with_labels=cfg.train.pseudo_diagnostics)
        self.profiles = ProfileAssignment.from_config(cfg.clients)
        self.pool: ClientPool | None = None
        self.phase: ClientPhase | None = None
        self.uplink = Uplink(cfg.compression)
        self.private = PrivateAggregate(self.strategy.aggregate, cfg) if privacy_enabled(cfg.privacy) else None

    # -- setup -------------------------------------------------------------------------------
    def _start_pool(self) -> None:
        c = self.cfg.clients
        profile = self.profiles.pool_profile()
        if self.fixed_pool_size:  # a Tune trial's actors go in the bundles it reserved
            slots: list[str | None] = [None] * self.fixed_pool_size
        else:
            slots = list(place_pool(profile, free_per_node(), jobs_per_round(c), c.max_actors))
        # The whole model (frozen backbone included) travels once, when the pool starts.
        noop = c.work == "noop"
        self._full_state = None if noop else ray.put(get_state(self.model, list(self.model.state_dict())))
        self._spec = None if noop else model_spec(self.model)
        self.pool = ClientPool(self._new_actor, slots)
        self.pool_size = len(slots)
        self.phase = ClientPhase(
            self.cfg, self.strategy, self.shards, self.partition.client_imgsz, self.pool, self.uplink.residual_of
        )

    def _new_actor(self, node: str | None):
        profile = self.profiles.pool_profile()
        where = {"scheduling_strategy": on_node(node)} if node else {}
        return ClientActor.options(**actor_options(profile), **where).remote(
            self.cfg.model_dump(mode="json"), self._spec, self._full_state, profile.threads, profile.budget_mib
        )

    def _open_tracker(self, run_id: str | None) -> None:
        cfg = self.cfg
        tags = {
            "strategy": cfg.strategy.name,
            "seed": str(cfg.seed),
            "git_commit": git_commit(),
            "platform": platform_stamp(),
            "config_key": cfg.key(),
            "weights": self.weights_tag,
            "run_dir": str(self.run_dir),
        }
        job_id = ray.get_runtime_context().get_job_id()
        tags["ray_job_id"] = job_id or ""
        tags.update(self.extra_tags)
        self.tracker = Tracker(
            self.tracking_uri,
            cfg.tracking.experiment,
            run_id=run_id,
            run_name=cfg.tracking.run_name or self.run_dir.name,
            tags=tags,
        )
        if run_id is None:
            self.tracker.log_params(cfg.flat())
            resolved = self.run_dir / "config.yaml"
            cfg.dump_yaml(resolved)
            self.tracker.log_artifact(resolved)

    def state(self) -> State:
        """The server state that can change (what checkpoints hold)."""
        return get_state(self.model, self.strategy.state_keys(self.model))

    def client_table(self, rnd: int) -> Path:
        return self.run_dir / "clients" / f"round_{rnd:04d}.csv"

    def _restore(self, path: Path) -> int:
        blob = load_checkpoint(path)
        set_state(self.model, blob["state"])
        self.strategy.load_state_dict(blob["strategy"])
        self.uplink.load_state_dict(blob.get("uplink", {}))
        self.history = blob["history"]
        self._open_tracker(blob["run_id"])
        return int(blob["round"])

    def _notify(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- the loop ------------------------------------------------------------------------------
    def _finish_round(self, rnd: int, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.history.append({"round": rnd, **metrics})
        t0 = time.perf_counter()
        self._notify("on_round_end", rnd, metrics)
        # The records' own cost (MLflow, checkpoint, a sweep's report) can only be logged after them.
        record_s = time.perf_counter() - t0
        self.tracker.log_metrics({"phase_seconds/record": record_s}, step=rnd)
        return {"round": rnd, **metrics, "phase_seconds/record": record_s}

    def run(self) -> Iterator[dict]:
        try:
            yield from self._run()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None

    def _run(self) -> Iterator[dict]:
        start_round = 0
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is not None:
            start_round = self._restore(ckpt)
            self._notify("on_resume", start_round)
            yield {"event": "resumed", "round": start_round}
        else:
            self._open_tracker(None)
            t0 = time.perf_counter()
            self.strategy.init_weights(self.model, self.server.samples())
            self.strategy.begin_training(self.model)
            losses = self.server.warmup(self.cfg.train.warmup_epochs, self.strategy.server_plan(0))
            metrics = {
                **self.server.evaluate(),
                **{f"server/{k}": v for k, v in losses.items()},
                "round_seconds": time.perf_counter() - t0,
            }
            yield {"event": "round", **self._finish_round(0, metrics)}
        rounds = self.strategy.num_rounds()
        if self.strategy.uses_clients and start_round < rounds:
            self._start_pool()
        for rnd in range(start_round + 1, rounds + 1):
            try:
                record = self._finish_round(rnd, self._one_round(rnd))
            except TooFewClients:
                self._notify("on_run_end", "FAILED")
                raise
            yield {"event": "round", **record}
            if self.stop_after is not None and rnd >= self.stop_after and rnd < rounds:
                self._notify("on_run_end", "KILLED")
                yield {"event": "stopped", "round": rnd}
                return
        self._notify("on_run_end", "FINISHED")
        yield {"event": "done", "run_id": self.tracker.run_id, "run_dir": str(self.run_dir)}

    def _aggregate(self, global_state: State, kept: list[ClientResult], rnd: int, metrics: dict[str, float]) -> State:
        if self.private is None:
            return self.strategy.aggregate(global_state, kept, rnd)
        merged, privacy_metrics = self.private(global_state, kept, rnd)
        metrics.update(privacy_metrics)
        return merged

    def _evaluates(self, rnd: int) -> bool:
        return rnd % self.cfg.train.eval_every == 0 or rnd == self.strategy.num_rounds()

    def _one_round(self, rnd: int) -> dict[str, float]:
        """Round ``rnd``'s metrics, with the wall time of each phase as ``phase_seconds/<phase>``."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        clock = PhaseClock(metrics)
        moved: tuple[State, State] | None = None  # (sent to the clients, aggregated)
        if self.strategy.uses_clients:
            global_state = self.state()
            with clock("clients"):
                outcome = self.phase.run(rnd, global_state)
            for f in outcome.failures:
                print(f"round {rnd}: client {f.client_id} failed: {f.error.splitlines()[0]}", flush=True)
            write_client_rows(self.client_table(rnd), client_rows(outcome, self.profiles))
            check_quorum(outcome, self.cfg.clients.min_clients)
            with clock("aggregate"):
                self.uplink.receive(outcome.kept, global_state)
                set_state(self.model, self._aggregate(global_state, outcome.kept, rnd, metrics))
                moved = (global_state, self.state())
            metrics.update(round_metrics(outcome, state_nbytes(global_state)))
            metrics.update(self.strategy.round_metrics(outcome.kept, self.shards))
            metrics.update(pseudo_label_metrics(outcome.kept, self.shards))
            metrics.update(class_threshold_metrics(outcome.kept, self.cfg.data.classes))
            outcome.release_updates()  # before the server epoch, which needs the memory more
        with clock("server"):
            self.strategy.begin_training(self.model)
            plan = self.strategy.server_plan(rnd)
            server_losses = self.server.train_epochs(self.cfg.train.server_epochs, rnd, plan)
            server_losses.update(self.strategy.server_metrics(self.model))
        if moved is not None:
            metrics.update(round_drift(*moved, self.state()))
        metrics.update({f"server/{k}": v for k, v in server_losses.items()})
        if self._evaluates(rnd):
            with clock("eval"):
                metrics.update(self.server.evaluate())
        metrics["round_seconds"] = time.perf_counter() - t0
        return metrics


class PhaseClock:
    """``with clock("server"): ...`` adds that block's wall seconds to ``metrics["phase_seconds/server"]``."""

    def __init__(self, metrics: dict[str, float]):
        self.metrics = metrics

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"phase_seconds/{phase}"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - t0


@ray.remote(max_restarts=0)
class DriverActor:
    def __init__(
        self,
        cfg_dict: dict,
        run_dir: str,
        partition_root: str,
        weights: str | None,
        tracking_uri: str,
        resume: bool,
        stop_after: int | None = None,
        pool_size: int | None = None,
    ):
        cfg = ExperimentConfig.model_validate(cfg_dict)
        self.sim = Simulation(
            cfg,
            Path(run_dir),
            Path(partition_root),
            weights,
            tracking_uri,
            resume,
            stop_after=stop_after,
            pool_size=pool_size,
        )

    def run(self):
        yield from self.sim.run()
