"""The sweep's MLflow parent run: created once, its id kept in the sweep directory for resumes.

Children are the trials' own simulation runs, tagged ``mlflow.parentRunId`` (the UI nests
them). A trial that ASHA stops, or that dies, never reaches the simulation's own ``finish``, so
at the end of the sweep the parent closes such runs as KILLED / FAILED with a ``sweep.outcome``
tag, instead of leaving them RUNNING forever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.tracking import Tracker

ID_FILE = "parent_run.json"


def open_parent(storage: Path, uri: str, experiment: str, name: str, params: dict[str, str]) -> Tracker:
    """The sweep's parent run: resumed from ``<storage>/parent_run.json`` when it exists there."""
    path = storage / ID_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") == uri:
            return Tracker(uri, experiment, run_id=saved["run_id"])
        print(f"sweep: tracking URI changed since the sweep started ({saved.get('tracking_uri')}); new parent run")
    tracker = Tracker(uri, experiment, run_name=name, tags={"sweep": name, "sweep.role": "parent"})
    tracker.log_params(params)
    storage.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": uri, "experiment": experiment}))
    return tracker


def child_runs(parent: Tracker) -> pd.DataFrame:
    """``run_id, trial_id, status, start_time`` of every run tagged with this parent."""
    run = parent.client.get_run(parent.run_id)
    found = parent.client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'", max_results=50000
    )
    rows = [
        {
            "run_id": r.info.run_id,
            "trial_id": r.data.tags.get("trial_id"),
            "status": r.info.status,
            "start_time": r.info.start_time,
        }
        for r in found
    ]
    return pd.DataFrame(rows, columns=["run_id", "trial_id", "status", "start_time"])


def close_children(parent: Tracker, trials: pd.DataFrame) -> dict[str, str]:
    """Tag each child with its trial's outcome, end runs left RUNNING; returns trial_id -> run_id."""
    outcome = dict(zip(trials["trial_id"], trials["status"], strict=True))
    latest: dict[str, str] = {}
    for trial_id, group in child_runs(parent).sort_values("start_time").groupby("trial_id"):
        if trial_id not in outcome:
            continue
        latest[trial_id] = group["run_id"].iloc[-1]
        for row in group.itertuples():
            # A trial restarted before its first checkpoint opened a second run; the last one counts.
            label = outcome[trial_id].lower() if row.run_id == latest[trial_id] else "superseded"
            parent.client.set_tag(row.run_id, "sweep.outcome", label)
            if row.status == "RUNNING":
                parent.client.set_terminated(
                    row.run_id, status="FAILED" if label in ("error", "superseded") else "KILLED"
                )
    return latest


def record_best(parent: Tracker, best: dict[str, Any], run_id: str | None, params: list[str], step: int) -> None:
    tags = {"best.trial_id": str(best["trial_id"]), "best.status": str(best["status"])}
    if run_id:
        tags["best.run_id"] = run_id
    tags.update({f"best.{p}": json.dumps(best.get(p)) for p in params})
    parent.set_tags(tags)
    if run_id:
        # The best trial's final metrics, under their own names: the UI shows them on the parent row.
        final = parent.client.get_run(run_id).data.metrics
        parent.log_metrics(final, step=step)
