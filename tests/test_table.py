import csv

import mlflow

from tests.conftest import TINY, run_fedsim


def test_table_runs_missing_pairs_once_and_reads_mlflow(tmp_path):
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
        "rounds=1",
    ]
    first = run_fedsim(args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 of 2 runs already in MLflow; running 2" in first.stdout
    second = run_fedsim(args, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 of 2 runs already in MLflow; running 0" in second.stdout

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 2  # nothing was run twice
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert [r["strategy"] for r in rows] == ["server_only", "scl_frozen"]
    for row in rows:
        run = runs[runs["tags.strategy"] == row["strategy"]].iloc[0]
        assert row["seeds"] == "0"
        for domain in ("cloudy", "rainy", "snowy", "total"):
            assert abs(float(row[f"{domain}_mean"]) - run[f"metrics.map50/{domain}"]) < 1e-9
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| strategy | cloudy | rainy | snowy | total | seeds |" in md and "server_only" in md
