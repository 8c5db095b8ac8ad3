"""MLflow -> pandas: the runs of an experiment as one table, and their per-round curves.

``mlflow.search_runs`` returns only the latest value of each metric (the last round, as every
simulation logs with ``step=round``); curves need ``MlflowClient.get_metric_history``. Sweep
parents (tag ``sweep.role = parent``) carry their best child's numbers, so they are kept apart
from the runs they summarise.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

# Params that say where a run wrote, not what it computed.
_NOT_KEY = ("params.tracking.", "params.output_dir")
SUMMARY = ["client/peak_mem_mib", "bytes_up"]


def search(experiment: str, tracking_uri: str, filter_string: str = "") -> pd.DataFrame:
    """All runs of ``experiment`` as ``mlflow.search_runs`` returns them (ValueError if none)."""

    if MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment) is None:
        raise ValueError(f"compare: no experiment named {experiment!r} at {tracking_uri}")
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=[experiment], filter_string=filter_string, max_results=50000, order_by=["start_time ASC"]
    )
    if runs.empty:
        where = f" matching {filter_string!r}" if filter_string else ""
        raise ValueError(f"compare: experiment {experiment!r} has no runs{where}")
    return runs


def column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def split_parents(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(simulation runs, sweep parent runs)."""
    is_parent = column(runs, "tags.sweep.role") == "parent"
    return runs[~is_parent].reset_index(drop=True), runs[is_parent].reset_index(drop=True)


def domains(runs: pd.DataFrame) -> list[str]:
    found = [c.removeprefix("metrics.map50/") for c in runs.columns if c.startswith("metrics.map50/")]
    return sorted(d for d in found if d != "total")


def key_params(runs: pd.DataFrame) -> list[str]:
    """Param names (without ``params.``) whose values differ between the runs."""
    out = []
    for c in runs.columns:
        if c.startswith("params.") and not c.startswith(_NOT_KEY) and runs[c].nunique(dropna=False) > 1:
            out.append(c.removeprefix("params."))
    return sorted(out)


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: identity, the params that differ, final mAP@50 per domain and total, costs."""
    metric_keys = [f"map50/{d}" for d in domains(runs)] + ["map50/total"] + SUMMARY
    table = pd.DataFrame(
        {
            "run": column(runs, "tags.mlflow.runName"),
            "run_id": runs["run_id"],
            "strategy": column(runs, "tags.strategy"),
            "sweep": column(runs, "tags.sweep"),
            "status": runs["status"],
            "rounds": column(runs, "params.rounds"),
        }
    )
    for p in key_params(runs):
        if p != "rounds":
            table[p] = runs[f"params.{p}"]
    for k in metric_keys:
        table[k] = pd.to_numeric(column(runs, f"metrics.{k}"), errors="coerce")
    return table


def curves(runs: pd.DataFrame, tracking_uri: str, keys: list[str]) -> pd.DataFrame:
    """Long table ``run_id, run, strategy, sweep, key, round, value`` of each key's history."""

    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    names = column(runs, "tags.mlflow.runName")
    strategies = column(runs, "tags.strategy")
    sweeps = column(runs, "tags.sweep")
    for i, run_id in enumerate(runs["run_id"]):
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append(
                    {
                        "run_id": run_id,
                        "run": names.iloc[i],
                        "strategy": strategies.iloc[i],
                        "sweep": sweeps.iloc[i],
                        "key": key,
                        "round": int(m.step),
                        "value": float(m.value),
                    }
                )
    out = pd.DataFrame(rows, columns=["run_id", "run", "strategy", "sweep", "key", "round", "value"])
    return out.sort_values(["run_id", "key", "round"], ignore_index=True)


def sweep_objective(parents: pd.DataFrame, sweep: str) -> tuple[str, str]:
    """(metric, mode) a sweep optimised, from its parent's params; map50/total, max if unknown."""
    rows = parents[column(parents, "tags.sweep") == sweep]
    if not rows.empty and "params.sweep.objectives" in rows:
        raw = rows["params.sweep.objectives"].dropna()
        if not raw.empty:
            metric, mode = json.loads(raw.iloc[-1])[0]
            return str(metric), str(mode)
    return "map50/total", "max"
