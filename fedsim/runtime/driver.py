"""The round loop: warm-up, then sample -> clients -> aggregate -> server epoch -> evaluate -> log -> checkpoint.

``Simulation`` is the loop; ``DriverActor`` runs it inside Ray and streams one progress record per
round back to whoever started it. Every finished round is in MLflow and in a checkpoint before
the next one starts, so ``--resume`` continues from the last one with identical results.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util import ActorPool

from fedsim.config import ExperimentConfig
from fedsim.data.partition import Partition
from fedsim.model.detector import build_detector, get_state, model_spec, set_state, state_nbytes
from fedsim.runtime.client import ClientActor
from fedsim.runtime.messages import ClientFailure, ClientJob, ClientResult
from fedsim.runtime.resources import PROFILES, actor_options, pool_size
from fedsim.runtime.server import ServerTrainer, derive_seed
from fedsim.tracking import Tracker, git_commit


def checkpoint_path(run_dir: Path, rnd: int) -> Path:
    return run_dir / "checkpoints" / f"round_{rnd:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return found[-1] if found else None


def client_mean(results: list[ClientResult], key: str) -> float:
    values = [r.metrics[key] for r in results if key in r.metrics]
    return float(np.mean(values)) if values else 0.0


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
    ):
        from strategies import build as build_strategy

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        torch.set_num_threads(cfg.train.server_threads)
        torch.manual_seed(cfg.seed)
        self.partition = Partition.load(Path(partition_root))
        self.strategy = build_strategy(cfg)
        self.model = self.strategy.build_model(build_detector(cfg.model.arch, cfg.data.classes, weights))
        self.server = ServerTrainer(self.model, self.partition, cfg)
        self.tracking_uri = tracking_uri
        self.history: list[dict[str, float]] = []
        self.extra_tags = extra_tags or {}
        self.fixed_pool_size = pool_size  # e.g. a Tune trial that reserved its bundles
        self.stop_after = stop_after  # end early, as a killed run would, leaving the MLflow run unfinished
        self.pool: ActorPool | None = None

    # -- setup -------------------------------------------------------------------------------
    def _start_pool(self) -> None:
        profile = PROFILES[self.cfg.clients.profile]
        per_round = max(1, int(round(self.cfg.clients.sampling_rate * self.cfg.clients.num_clients)))
        n = self.fixed_pool_size or pool_size(
            profile, ray.available_resources(), per_round, self.cfg.clients.max_actors
        )
        # The whole model (frozen backbone included) travels once, when the pool starts.
        self._full_state = ray.put(get_state(self.model, list(self.model.state_dict())))
        actors = [self._new_actor() for _ in range(n)]
        ray.get([a.ready.remote() for a in actors])
        self.pool = ActorPool(actors)
        self.pool_size = n

    def _new_actor(self):
        profile = PROFILES[self.cfg.clients.profile]
        return ClientActor.options(**actor_options(profile)).remote(
            self.cfg.model_dump(mode="json"),
            model_spec(self.model),
            self._full_state,
            profile.threads,
            profile.memory_gib * 1024,
        )

    def _open_tracker(self, run_id: str | None) -> None:
        cfg = self.cfg
        tags = {
            "strategy": cfg.strategy.name,
            "seed": str(cfg.seed),
            "git_commit": git_commit(),
            "config_key": cfg.key(),
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

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, rnd: int) -> None:
        path = checkpoint_path(self.run_dir, rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "round": rnd,
            "state": self._state(),
            "strategy": self.strategy.state_dict(),
            "run_id": self.tracker.run_id,
            "history": self.history,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(path)
        self._write_csv()

    def _state(self) -> dict[str, np.ndarray]:
        return get_state(self.model, self.strategy.state_keys(self.model))

    def _load(self, path: Path) -> int:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        set_state(self.model, blob["state"])
        self.strategy.load_state_dict(blob["strategy"])
        self.history = blob["history"]
        self._open_tracker(blob["run_id"])
        return int(blob["round"])

    def _write_csv(self) -> None:
        path = self.run_dir / "rounds.csv"
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k != "round", k))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        self.tracker.log_artifact(path)

    # -- the loop ------------------------------------------------------------------------------
    def _record(self, rnd: int, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.tracker.log_metrics(metrics, step=rnd)
        self.history.append({"round": rnd, **metrics})
        self._save(rnd)
        return {"round": rnd, **metrics}

    def _client_round(self, rnd: int) -> tuple[list[ClientResult], list[ClientFailure]]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, rnd])
        selected = self.strategy.sample_clients(rnd, cfg.clients.num_clients, rng)
        shards = {c.client_id: c for c in self.partition.clients}
        settings = self.strategy.client_settings(rnd)
        state_ref = ray.put(self._state())
        jobs = [
            ClientJob(
                cid,
                rnd,
                str(shards[cid].images),
                self.partition.client_imgsz,
                derive_seed(cfg.seed, rnd, cid, 3),
                settings,
            )
            for cid in selected
        ]
        for job in jobs:
            self.pool.submit(lambda actor, job: actor.run.remote(job, state_ref), job)
        outcomes, died = [], []
        while self.pool.has_next():
            try:
                outcomes.append(self.pool.get_next_unordered())
            except ray.exceptions.RayActorError as exc:
                # The pool drops the dead actor; a fresh one takes its place for the jobs left.
                died.append(str(exc).splitlines()[0])
                self.pool.push(self._new_actor())
        answered = {o.client_id for o in outcomes}
        outcomes += [
            ClientFailure(j.client_id, rnd, f"client actor died: {died[0] if died else 'unknown'}")
            for j in jobs
            if j.client_id not in answered
        ]
        # Completion order varies between runs; aggregation order must not.
        results = sorted((o for o in outcomes if isinstance(o, ClientResult)), key=lambda r: r.client_id)
        failures = sorted((o for o in outcomes if isinstance(o, ClientFailure)), key=lambda f: f.client_id)
        return results, failures

    def run(self) -> Iterator[dict]:
        start_round = 0
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is not None:
            start_round = self._load(ckpt)
            yield {"event": "resumed", "round": start_round}
        else:
            self._open_tracker(None)
            t0 = time.perf_counter()
            self.strategy.on_start(self.server)
            losses = self.server.warmup(self.cfg.train.warmup_epochs)
            metrics = {
                **self.server.evaluate(),
                **{f"server/{k}": v for k, v in losses.items()},
                "round_seconds": time.perf_counter() - t0,
            }
            yield {"event": "round", **self._record(0, metrics)}
        rounds = self.strategy.num_rounds()
        if self.strategy.uses_clients and start_round < rounds:
            self._start_pool()
        for rnd in range(start_round + 1, rounds + 1):
            yield {"event": "round", **self._record(rnd, self._one_round(rnd))}
            if self.stop_after is not None and rnd >= self.stop_after:
                self.tracker.finish("KILLED")
                yield {"event": "stopped", "round": rnd}
                return
        final = self.run_dir / "final_state.npz"
        np.savez(final, **self._state())
        self.tracker.log_artifact(final)
        self.tracker.finish("FINISHED")
        yield {"event": "done", "run_id": self.tracker.run_id, "run_dir": str(self.run_dir)}

    def _one_round(self, rnd: int) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.strategy.uses_clients:
            global_state = self._state()
            results, failures = self._client_round(rnd)
            for f in failures:
                print(f"round {rnd}: client {f.client_id} failed: {f.error.splitlines()[0]}", flush=True)
            if results:
                set_state(self.model, self.strategy.aggregate(global_state, results, rnd))
            metrics.update(
                {
                    "clients/ok": len(results),
                    "clients/failed": len(failures),
                    "client/box_loss": client_mean(results, "box_loss"),
                    "client/cls_loss": client_mean(results, "cls_loss"),
                    "client/n_pseudo": sum(r.metrics.get("n_pseudo", 0) for r in results),
                    "client/peak_mem_mib": max((r.metrics.get("peak_mem_mib", 0) for r in results), default=0),
                    "client/seconds": client_mean(results, "seconds"),
                    "bytes_up": sum(r.metrics.get("bytes_up", 0) for r in results),
                    "bytes_down": state_nbytes(global_state) * (len(results) + len(failures)),
                }
            )
            domains = {c.client_id: c.domain for c in self.partition.clients}
            metrics.update(self.strategy.round_metrics(results, domains))
        server_losses = self.strategy.server_update(self.server, rnd)
        metrics.update({f"server/{k}": v for k, v in server_losses.items()})
        metrics.update(self.server.evaluate())
        metrics["round_seconds"] = time.perf_counter() - t0
        return metrics


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
