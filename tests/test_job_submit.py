"""`ray job submit --working-dir . -- fedsim run configs/tiny.yaml` against a head this test starts."""

from __future__ import annotations

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
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    env = fedsim_env(PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    start = subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)


def test_job_submit_runs_tiny_on_a_head(ray_head, tmp_path):
    address, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "FEDSIM_CACHE": os.environ["FEDSIM_CACHE"]}}
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
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["tags.ray_job_id"]
    assert "metrics.map50/total" in runs.columns
