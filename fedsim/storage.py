"""Where a run's files live: one storage root that every node of the cluster reaches.

Everything fedsim writes or reads by a relative path resolves against the storage root, never
against a process's working directory: the run directory (``output_dir``, checkpoints, client
tables), the data cache (generated data sets, partition shards, the foundation checkpoint), a
file MLflow store (``sqlite:///runs/mlflow.db`` by default), and relative paths in a config
(``data.root``, ``data.manifest``, ``model.weights``).

- ``$FEDSIM_STORAGE`` when set: on a cluster, a shared filesystem path (NFS, a mounted bucket).
- else, inside a Ray job (``ray job submit``): ``~/fedsim``. The job's working directory is a
  copy that each node unpacks for itself, so a file written there is invisible to an actor on
  another node. ``~`` is shared by the nodes of one machine; on a real cluster set
  ``$FEDSIM_STORAGE``, and the per-node check (``fedsim/runtime/nodes.py``) names any node that
  cannot reach it.
- else the current directory, so a local ``fedsim run`` writes ``./runs`` and ``./data/cache``.

``$FEDSIM_CACHE`` still moves the data cache alone (tests share one prebuilt cache that way).
"""

from __future__ import annotations

import os
from pathlib import Path


def in_ray_job() -> bool:
    """Inside the entrypoint of ``ray job submit`` (or a process it started)."""
    return bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def storage_root() -> Path:
    configured = os.environ.get("FEDSIM_STORAGE")
    if configured:
        return Path(configured).expanduser().resolve()
    if in_ray_job():
        return (Path.home() / "fedsim").resolve()
    return Path.cwd().resolve()


def resolve(path: str | os.PathLike) -> Path:
    """``path`` made absolute: as given when absolute (or ``~``), else under the storage root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (storage_root() / p).resolve()


def cache_dir() -> Path:
    """Generated data sets, partitions, pretrained weights and Ultralytics settings."""
    configured = os.environ.get("FEDSIM_CACHE")
    return resolve(configured) if configured else storage_root() / "data" / "cache"
