"""MLflow records of a simulation: one run, config as params, per-round metrics, artifacts.

Default store: ``sqlite:///runs/mlflow.db`` under the working directory; ``$MLFLOW_TRACKING_URI``
or ``tracking.uri`` override it. Everything is written as soon as it exists, so a run that
dies keeps its finished rounds.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from fedsim.storage import resolve

DEFAULT_URI = "sqlite:///runs/mlflow.db"


def resolve_uri(configured: str | None) -> str:
    """The tracking URI to use; a relative sqlite path lives under the storage root (``fedsim/storage.py``)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = resolve(uri[len(prefix) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(path)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# The packages whose versions change a run's numbers: training and metrics (torch, ultralytics),
# and the synthetic images' rendering and JPEG encoding (opencv, numpy).
_NUMERIC_PACKAGES = ("torch", "ultralytics", "opencv-python", "numpy")


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def platform_stamp() -> str:
    """Where a run's figures came from beyond its commit and weights: CPU and numeric packages.

    The same commit and seed give the same figures on one machine; another CPU or another OpenCV
    build changes the synthetic images, the foundation checkpoint and so every figure."""
    versions = []
    for name in _NUMERIC_PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return f"{cpu_model()}; " + ", ".join(versions)


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a sqlite store (not ./mlruns of whichever process created the experiment)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).parent / "mlartifacts" / experiment).as_uri()


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one run (created, or resumed by id)."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ):

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(
                    experiment, artifact_location=default_artifact_location(uri, experiment)
                )
            )
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_params(self, params: dict[str, str]) -> None:

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
