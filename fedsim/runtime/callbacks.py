"""What happens after a round, as a list of callbacks: MLflow records, checkpoints, Tune reports.

``Simulation`` calls every callback at the same three points, in list order:

- ``on_resume(sim, rnd)``: a resumed run restored round ``rnd`` (its history is ``sim.history``);
- ``on_round_end(sim, rnd, metrics)``: round ``rnd`` (0: the warm-up) is finished;
- ``on_run_end(sim, status)``: ``FINISHED``, ``KILLED`` (``stop_after``) or ``FAILED``.

The engine's own callbacks log to MLflow first and checkpoint second, so a round is in MLflow
before the checkpoint that lets a resumed run skip it. A sweep trial is a simulation with one more
callback (``sweeps.trainable.TuneReport``). Console progress is not a callback: the driver actor
streams one record per round to whoever started it (``fedsim.experiment.simulate``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedsim.runtime.uplink import Uplink
from fedsim.tracking import Tracker
from fedsim.types import State


class RunView(Protocol):
    """What a callback sees of a run (``fedsim.runtime.driver.Simulation`` provides it)."""

    run_dir: Path
    tracker: Tracker
    history: list[dict[str, float]]
    strategy: Any
    uplink: Uplink

    def state(self) -> State: ...

    def client_table(self, rnd: int) -> Path: ...


class Callback:
    def on_resume(self, sim: RunView, rnd: int) -> None:
        pass

    def on_round_end(self, sim: RunView, rnd: int, metrics: dict[str, float]) -> None:
        pass

    def on_run_end(self, sim: RunView, status: str) -> None:
        pass


class MlflowLogger(Callback):
    """Per-round metrics (step = round), the per-client tables, and the final state."""

    def on_round_end(self, sim: RunView, rnd: int, metrics: dict[str, float]) -> None:
        sim.tracker.log_metrics(metrics, step=rnd)
        table = sim.client_table(rnd)
        if table.exists():
            sim.tracker.log_artifact(table, "clients")

    def on_run_end(self, sim: RunView, status: str) -> None:
        if status == "FINISHED":
            final = sim.run_dir / "final_state.npz"
            np.savez(final, **sim.state())
            sim.tracker.log_artifact(final)
        sim.tracker.finish(status)


def checkpoint_path(run_dir: Path, rnd: int) -> Path:
    return run_dir / "checkpoints" / f"round_{rnd:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return found[-1] if found else None


def save_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Atomically write a round checkpoint: tensors and plain values, so it loads with weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {**blob, "state": {k: torch.tensor(v) for k, v in blob["state"].items()}}  # keeps 0-d shapes
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blob["state"] = {k: v.numpy() for k, v in blob["state"].items()}
    return blob


class Checkpointer(Callback):
    """A checkpoint per round (state, round, strategy state, MLflow run id, history, top-k residuals)
    and rounds.csv.

    ``keep``: the newest checkpoints kept on disk (None: all); older ones go only after the new
    one is complete.
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep

    def on_round_end(self, sim: RunView, rnd: int, metrics: dict[str, float]) -> None:
        path = checkpoint_path(sim.run_dir, rnd)
        blob = {
            "round": rnd,
            "state": sim.state(),
            "strategy": sim.strategy.state_dict(),
            "run_id": sim.tracker.run_id,
            "history": sim.history,
        }
        if sim.uplink.residuals:  # top-k error feedback: the devices' memory, for an exact resume
            blob["uplink"] = sim.uplink.state_dict()
        save_checkpoint(path, blob)
        if self.keep:
            for old in sorted(path.parent.glob("round_*.pt"))[: -self.keep]:
                old.unlink()
        rounds_csv = sim.run_dir / "rounds.csv"
        keys = sorted({k for row in sim.history for k in row}, key=lambda k: (k != "round", k))
        with rounds_csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(sim.history)
        sim.tracker.log_artifact(rounds_csv)
