"""Trials -> one table, the best trial, and the Pareto front of a multi-objective sweep.

Values are each trial's last report, i.e. its model after the last round it ran. For a single
objective the best trial is picked among those that ran every round: ASHA only lets a trial
through a rung when it beats the others there, and a trial stopped after round 1 is not a
finished configuration to recommend.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

_TRIAL_DIR = re.compile(r"trial_(\w+)$")
EPSILON = "privacy/epsilon"  # kept beside the objectives whenever trials report it (DP runs)


def trial_table(grid: Any, params: list[str], metrics: list[str], max_rounds: int) -> pd.DataFrame:
    """One row per trial of a Tune ``ResultGrid``: id, status, rounds, params, objectives (and the
    privacy spent, ``privacy/epsilon``, when trials report it)."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        match = _TRIAL_DIR.search(str(result.path))
        trial_id = m.get("trial_id") or (match.group(1) if match else str(result.path))
        rounds = int(m.get("training_iteration", 0) or 0)
        status = "ERROR" if result.error else ("COMPLETED" if rounds >= max_rounds else "STOPPED")
        row: dict[str, Any] = {"trial_id": trial_id, "status": status, "rounds": rounds}
        row.update({p: result.config.get(p) for p in params})
        row.update({k: m.get(k) for k in metrics})
        if EPSILON in m and EPSILON not in metrics:
            row[EPSILON] = m[EPSILON]
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def pareto_front(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Rows not dominated by any other (at least as good on every objective, better on one)."""
    scored = table.dropna(subset=metrics)
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    values = [[s * float(row[k]) for k, s in zip(metrics, signs, strict=True)] for _, row in scored.iterrows()]

    def dominated(i: int) -> bool:
        a = values[i]
        for j, b in enumerate(values):
            if (
                j != i
                and all(y >= x for x, y in zip(a, b, strict=True))
                and any(y > x for x, y in zip(a, b, strict=True))
            ):
                return True
        return False

    keep = [i for i in range(len(values)) if not dominated(i)]
    front = scored.iloc[keep]
    return front.sort_values(metrics[0], ascending=modes[0] == "min", ignore_index=True)


def best_trial(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> dict[str, Any] | None:
    """Single objective: best finished trial (else best of all); several: Pareto member best on the first."""
    pool = table.dropna(subset=metrics)
    if pool.empty:
        return None
    if len(metrics) > 1:
        pool = pareto_front(pool, metrics, modes)
    elif (pool["status"] == "COMPLETED").any():
        pool = pool[pool["status"] == "COMPLETED"]
    ordered = pool.sort_values(metrics[0], ascending=modes[0] == "min", kind="stable")
    return ordered.iloc[0].to_dict()


def spent_epsilon(best: dict[str, Any]) -> float | None:
    """The privacy a trial spent by its last report, if it ran with DP noise."""
    value = best.get(EPSILON)
    return None if value is None or pd.isna(value) else float(value)
