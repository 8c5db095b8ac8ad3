"""The application layer: prepare data and weights, start or join Ray, run / resume / stop a simulation.

The one API that the CLI, ``fedsim table``, sweeps, benchmarks and tests use. Nothing here parses
arguments or prints unless given an ``echo``; the CLI maps the exceptions to exit codes:

- ``ConfigError`` (bad config), ``CheckFailed`` (data, weights or resources that would not run),
  ``DataError``: all raised before any Ray process exists;
- ``StorageUnreachable``: a node of the cluster cannot read the inputs or write the run directory
  (checked on every node before the driver starts);
- ``RunFailed``: a simulation that stopped with an error (its finished rounds are kept).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import ray
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedsim.config import ExperimentConfig
from fedsim.data.formats import prepare_partition
from fedsim.data.partition import Partition
from fedsim.offline import offline_env
from fedsim.preflight import check_or_raise
from fedsim.runtime.callbacks import latest_checkpoint, load_checkpoint
from fedsim.runtime.driver import DriverActor
from fedsim.runtime.nodes import check_storage
from fedsim.storage import cache_dir, resolve, storage_root
from fedsim.tracking import resolve_uri
from fedsim.train.foundation import pretrain

Echo = Callable[[str], None]


class RunFailed(RuntimeError):
    """A simulation that stopped with an error (its finished rounds are kept)."""


def prepare_data(cfg: ExperimentConfig, echo: Echo = print) -> Partition:
    """The PSSFL partition for ``cfg.data`` (generated or read, then split; cached)."""
    return prepare_partition(cfg.data, cfg.clients.num_clients, cache_dir(), echo)


def prepare_weights(cfg: ExperimentConfig) -> str | None:
    """The checkpoint path a run starts from (the cached foundation model is built on first use)."""

    m = cfg.model
    if m.weights != "foundation":
        return None if m.weights is None else str(resolve(m.weights))
    path = pretrain(
        cache_dir(),
        m.arch,
        m.pretrain_images,
        m.pretrain_epochs,
        m.pretrain_seed,
        cfg.data.width,
        cfg.data.height,
        threads=cfg.train.server_threads,
    )
    return str(path)


def _not_in_job_env(env: dict[str, str]) -> dict[str, str]:
    """Ray refuses to merge a key the submitted job's runtime env already sets; the job's value wins."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: v for k, v in env.items() if k not in taken}


def on_cluster() -> bool:
    """Inside ``ray job submit``, or pointed at a cluster by ``RAY_ADDRESS``."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def init_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster a job runs on, or start a private local one; True if this call started Ray.

    ``num_cpus`` sizes a local cluster (default: this machine's cores); a sweep declares more
    logical CPUs than cores so that its trials' placement groups fit (``sweeps/cluster.py``).
    """

    if ray.is_initialized():
        return False
    # Workers resolve nothing against their own working directory (a Tune trial's differs).
    env = {**offline_env(), "FEDSIM_STORAGE": str(storage_root())}
    if on_cluster():
        # These variables are merged into the job's runtime env so every worker starts offline.
        ray.init(address="auto", logging_level=logging.WARNING, runtime_env={"env_vars": _not_in_job_env(env)})
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )
    return True


def _run_dir_base(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{cfg.strategy.name}-s{cfg.seed}-{cfg.key()}"


def earlier_run_dir(cfg: ExperimentConfig) -> Path | None:
    """The newest run directory of exactly this config, if one was started before."""
    found = sorted(resolve(cfg.output_dir).glob(f"{_run_dir_base(cfg)}-*"))
    return found[-1] if found else None


def logged_elsewhere(run_dir: Path, uri: str) -> str | None:
    """The MLflow run id a run directory's last checkpoint belongs to, when the store at ``uri``
    does not hold that run (None: no checkpoint, or the store holds it)."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        return None
    run_id = load_checkpoint(ckpt)["run_id"]
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return run_id
    return None


def new_run_dir(cfg: ExperimentConfig, resume: bool, echo: Echo = print) -> Path:
    root = resolve(cfg.output_dir)
    if resume:
        found = earlier_run_dir(cfg)
        if found:
            return found
        echo(f"resume: no earlier run of this config under {root}; starting a new one")
    return root / f"{_run_dir_base(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_round(rec: dict, domains: list[str], rounds: int) -> str:
    """One console line per round: mAP@50 per domain, total, client fates, privacy spent, seconds."""
    if "map50/total" in rec:
        maps = "  ".join(f"{d} {rec.get(f'map50/{d}', float('nan')):.3f}" for d in domains)
        maps = f"mAP@50 {maps}  total {rec['map50/total']:.3f}"
    else:
        maps = "(not evaluated: train.eval_every)"
    label = "warm-up" if rec["round"] == 0 else f"round {rec['round']}/{rounds}"
    extra = f"  clients {int(rec['clients/ok'])} ok" if "clients/ok" in rec else ""
    for fate in ("failed", "stragglers"):
        if rec.get(f"clients/{fate}"):
            extra += f" {int(rec[f'clients/{fate}'])} {fate}"
    if "privacy/epsilon" in rec:
        extra += f"  epsilon {rec['privacy/epsilon']:.3g}"
    return f"{label:<12} {maps}{extra}  {rec['round_seconds']:.1f}s"


def simulate(
    cfg: ExperimentConfig,
    resume: bool = False,
    stop_after: int | None = None,
    echo: Echo = print,
    pool_size: int | None = None,
    checked: bool = False,
) -> dict:
    """Run one simulation to the end (or to ``stop_after`` rounds) on a driver actor; the last record.

    Unless ``checked``, the preflight checks run first (``CheckFailed`` before Ray starts).
    """
    if not checked:
        check_or_raise(cfg)

    partition = prepare_data(cfg, echo)
    weights = prepare_weights(cfg)
    run_dir = new_run_dir(cfg, resume, echo)
    uri = resolve_uri(cfg.tracking.uri)
    if resume and (elsewhere := logged_elsewhere(run_dir, uri)):
        raise RunFailed(
            f"--resume: {run_dir} was logged to MLflow run {elsewhere}, which the store {uri} does not hold; "
            "resume with the store it was logged to (MLFLOW_TRACKING_URI or tracking.uri), or run without "
            "--resume to start afresh"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray()
    reads = [partition.root / "partition.json"] + ([Path(weights)] if weights else [])
    check_storage(reads, run_dir)  # every node, before any actor depends on it
    domains = list(partition.test)
    driver = DriverActor.options(num_cpus=0).remote(
        cfg.model_dump(mode="json"), str(run_dir), str(partition.root), weights, uri, resume, stop_after, pool_size
    )
    last: dict = {}
    for ref in driver.run.remote():
        try:
            rec = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise RunFailed(f"fedsim: run failed: {exc.cause if exc.cause else exc}") from exc
        if rec["event"] == "round":
            echo(format_round(rec, domains, cfg.rounds))
            last = rec
        elif rec["event"] == "resumed":
            echo(f"resumed {run_dir.name} after round {rec['round']}")
        elif rec["event"] == "stopped":
            echo(f"stopped after round {rec['round']} (--stop-after); continue with --resume")
        elif rec["event"] == "done":
            echo(f"done: {run_dir}  (MLflow run {rec['run_id']} at {uri})")
            last = {**last, **rec}
    return last
