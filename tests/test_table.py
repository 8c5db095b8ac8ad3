import csv
from importlib.metadata import version

import mlflow

from tests.conftest import TINY, run_fedsim


def test_table_runs_missing_pairs_once_and_reads_mlflow(tmp_path):
    # One pair was started before and died after round 1: the table continues it, not restarts it.
    early = run_fedsim(
        ["run", str(TINY), "--set", "strategy.name=scl_frozen", "--set", "rounds=2", "--stop-after", "1"],
        cwd=tmp_path,
        timeout=900,
    )
    assert early.returncode == 0, early.stderr[-3000:]
    args = [
        "table",
        "--config",
        str(TINY),
        "--strategies",
        "server_only,scl_frozen",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "rounds=2",
    ]
    first = run_fedsim(args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 of 2 runs already in MLflow; running 2" in first.stdout
    assert "[scl_frozen seed 0] resumed" in first.stdout
    second = run_fedsim(args, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 of 2 runs already in MLflow; running 0" in second.stdout

    # Another client recipe: the baselines train no clients, so their runs are reused, not rerun.
    recipe = ["--set", "train.client_lr=0.001", "--set", "train.box_thres=1.0", "--set", "train.conf_thres=0.3"]
    recipe += ["--set", "train.strong_scale=[0.8,1.2]", "--set", "compression.uplink=int8"]
    third = run_fedsim(args + recipe, cwd=tmp_path, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "2 of 2 runs already in MLflow; running 0" in third.stdout

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 2  # nothing was run twice, the interrupted pair included
    resumed = runs[runs["tags.strategy"] == "scl_frozen"].iloc[0]
    history = mlflow.MlflowClient().get_metric_history(resumed["run_id"], "map50/total")
    assert [m.step for m in history] == [0, 1, 2]
    # ...which is right: scl_frozen run afresh with that recipe scores exactly what the reused run did
    fresh = run_fedsim(
        ["run", str(TINY), "--set", "strategy.name=scl_frozen", "--set", "rounds=2", *recipe], cwd=tmp_path
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    every = mlflow.search_runs(experiment_names=["tiny"])
    again = every[(every["tags.strategy"] == "scl_frozen") & (every["tags.config_key"] != resumed["tags.config_key"])]
    assert len(every) == 3 and len(again) == 1
    again = again.iloc[0]
    rerun = mlflow.MlflowClient().get_metric_history(again["run_id"], "map50/total")
    assert [(m.step, m.value) for m in rerun] == [(m.step, m.value) for m in history]
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert [r["strategy"] for r in rows] == ["server_only", "scl_frozen"]
    for row in rows:
        run = runs[runs["tags.strategy"] == row["strategy"]].iloc[0]
        assert row["seeds"] == "0"
        for domain in ("cloudy", "rainy", "snowy", "total"):
            assert abs(float(row[f"{domain}_mean"]) - run[f"metrics.map50/{domain}"]) < 1e-9
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| strategy | cloudy | rainy | snowy | total | seeds |" in md and "server_only" in md
    stamp = runs["tags.platform"].iloc[0]
    assert f"Ran on: {stamp}\n" in md and f"torch {version('torch')}" in stamp


def test_a_run_logged_to_another_store_is_not_resumed_into_this_one(tmp_path):
    one = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'one.db'}"}
    other = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    run = ["run", str(TINY), "--set", "strategy.name=server_only"]
    first = run_fedsim(run, cwd=tmp_path, **one)
    assert first.returncode == 0, first.stderr[-3000:]
    # --resume against a store that lacks the run: refused, naming the run and the store
    refused = run_fedsim([*run, "--resume"], cwd=tmp_path, **other)
    assert refused.returncode != 0
    assert "was logged to MLflow run" in refused.stderr and "other.db does not hold" in refused.stderr
    # a table on that store runs the pair afresh instead of failing on the other store's run
    table = [
        "table",
        "--config",
        str(TINY),
        "--strategies",
        "server_only",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "t"),
    ]
    done = run_fedsim(table, cwd=tmp_path, **other)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "running 1" in done.stdout and "resumed" not in done.stdout
    mlflow.set_tracking_uri(other["MLFLOW_TRACKING_URI"])
    assert len(mlflow.search_runs(experiment_names=["tiny"], filter_string="attributes.status = 'FINISHED'")) == 1
