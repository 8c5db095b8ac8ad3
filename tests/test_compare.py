"""``fedsim compare`` / ``fedsim ui`` on the runs of the session's tiny sweep."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_fedsim
from tests.sweep_support import main_sweep

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep = main_sweep(tmp_path_factory)
    out = tmp_path_factory.mktemp("report")
    result = run_fedsim(
        ["compare", "--experiment", sweep.experiment, "--tracking-uri", sweep.uri, "--out", str(out)], cwd=out
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return sweep, out


def test_runs_csv_matches_mlflow(report):
    sweep, out = report
    table = pd.read_csv(out / "runs.csv")
    mlflow.set_tracking_uri(sweep.uri)
    runs = mlflow.search_runs(experiment_names=[sweep.experiment])
    runs = runs[runs["tags.sweep.role"] != "parent"].set_index("run_id")
    assert sorted(table["run_id"]) == sorted(runs.index)  # every simulation run, no sweep parent
    metrics = ["map50/cloudy", "map50/rainy", "map50/snowy", "map50/total", "client/peak_mem_mib", "bytes_up"]
    for _, row in table.iterrows():
        run = runs.loc[row["run_id"]]
        assert row["run"] == run["tags.mlflow.runName"] and row["strategy"] == run["tags.strategy"] == "fedavg"
        assert row["status"] == run["status"]
        for key in metrics:
            assert row[key] == pytest.approx(run[f"metrics.{key}"]), key
        # The swept params differ between the runs, so they are key params in the table.
        assert float(row["train.lr"]) == pytest.approx(float(run["params.train.lr"]))
    assert "tracking.run_name" not in table.columns and "output_dir" not in table.columns


def test_curves_csv_matches_metric_history(report):
    sweep, out = report
    curves = pd.read_csv(out / "curves.csv")
    client = MlflowClient(tracking_uri=sweep.uri)
    for run_id, group in curves[curves["key"] == "map50/total"].groupby("run_id"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "map50/total"))
        assert list(zip(group["round"], group["value"], strict=True)) == history


def test_report_is_self_contained_html(report):
    _, out = report
    page = (out / "report.html").read_text()
    assert page.count('<img alt="') >= 5  # curves, domain bars, scatter, parallel coordinates, importance
    assert page.count('src="data:image/png;base64,') == page.count("<img ")
    assert "<table" in page and "Sweep main" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch when opened


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    _, out = report
    png = tmp_path / "report.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1400,2400",
        (out / "report.html").resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.is_file(), "chromium wrote no screenshot"
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[:2] == (2400, 1400)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"screenshot looks blank ({len(colours)} colours)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_tracking_store(report):
    from dashboards.ui import launch_ui

    sweep, _ = report
    port = free_port()
    proc = launch_ui(sweep.uri, port=port)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "mlflow ui exited"
            try:
                with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer within 90 s"
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={sweep.experiment}"
        with opener.open(url, timeout=10) as r:
            assert sweep.experiment.encode() in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
