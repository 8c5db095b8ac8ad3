"""Shared fixtures: one data/weights cache per test session, and a way to call the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim  # noqa: F401  (sets the offline / loopback-only environment before anything else)

REPO = Path(__file__).resolve().parents[1]
FEDSIM = str(Path(sys.executable).parent / "fedsim")
TINY = REPO / "configs" / "tiny.yaml"

# Generated data and the tiny foundation checkpoint are reused across sessions on one machine
# (ignored by git); CI starts without them and builds them once.
os.environ.setdefault("FEDSIM_CACHE", str(REPO / "data" / "test-cache"))


def fedsim_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(fedsim.offline.offline_env())
    env.update(extra)
    return env


def run_fedsim(
    args: list[str], cwd: Path, timeout: int = 600, prefix: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), FEDSIM, *args],
        cwd=cwd,
        env=fedsim_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cpu_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
