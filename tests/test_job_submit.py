"""`ray job submit --working-dir . -- fedsim run configs/tiny.yaml` on a two-node cluster this test starts.

Two raylets on one machine (`ray start --head`, then `ray start --address`) are a real two-node
cluster: each node unpacks the job's working dir for itself, so the run must keep its files under
the storage root (``FEDSIM_STORAGE``), and clients must land on both nodes.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from tests.conftest import REPO, fedsim_env

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    # `ray stop` would end every Ray process on the machine; stop only this head's.
    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


@pytest.fixture
def two_nodes():
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard, gcs = free_port(), free_port()
    env = fedsim_env(PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    common = [f"--temp-dir={temp_dir}", "--num-cpus=1", "--disable-usage-stats"]
    head = ["--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true"]
    try:
        for role in (head, [f"--address=127.0.0.1:{gcs}"]):
            start = subprocess.run(
                [str(BIN / "ray"), "start", *role, *common], env=env, capture_output=True, text=True, timeout=180
            )
            assert start.returncode == 0, start.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)


def test_job_submit_runs_tiny_on_two_nodes(two_nodes, tmp_path):
    address, env = two_nodes
    storage = tmp_path / "storage"
    # no MLFLOW_TRACKING_URI: the default sqlite store lands under the storage root too
    runtime_env = {"env_vars": {"FEDSIM_STORAGE": str(storage), "FEDSIM_CACHE": os.environ["FEDSIM_CACHE"]}}
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "fedsim",
        "run",
        "configs/tiny.yaml",
        "--set",
        "clients.num_clients=4",
        "--set",
        "clients.sampling_rate=1.0",
    ]
    for _ in range(6):  # the head's job agent can take a while to come up on a loaded machine
        result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(10)
    assert result.returncode == 0, output[-4000:]
    assert "round 2/2" in output and "succeeded" in output
    assert "Request Entity Too Large" not in output  # .rayignore kept .git/.venv/data out of the upload
    mlflow.set_tracking_uri(f"sqlite:///{storage / 'runs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["tags.ray_job_id"]
    assert "metrics.map50/total" in runs.columns
    (run_dir,) = (storage / "runs").glob("tiny-fedavg-*")
    assert Path(runs.iloc[0]["tags.run_dir"]) == run_dir
    nodes = set()
    for table in sorted((run_dir / "clients").glob("round_*.csv")):
        with table.open() as f:
            rows = list(csv.DictReader(f))
        assert [r["status"] for r in rows] == ["ok"] * 4
        nodes |= {r["node"] for r in rows}
    assert len(nodes) == 2 and all(len(n) == 56 for n in nodes)  # Ray node ids: 28 bytes, hex
