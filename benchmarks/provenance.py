"""What a benchmark's table says about where its figures came from: command, code, weights, platform."""

from __future__ import annotations

import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

from fedsim.config import ExperimentConfig
from fedsim.experiment import prepare_weights
from fedsim.runtime.driver import weights_fingerprint
from fedsim.tracking import git_commit, platform_stamp

__all__ = ["command_line", "platform_stamp", "start_commit", "weights_stamp"]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


@cache
def start_commit() -> str:
    """The tree's commit (marked when it has uncommitted changes); call it first: later commits do not
    change the code a running benchmark executes, so the first answer is kept."""
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=False)
    return f"{git_commit()}{' (with uncommitted changes)' if status.stdout.strip() else ''}"


def weights_stamp(cfg: ExperimentConfig) -> str:
    """The start weights as runs tag them (``weights``: name:sha1)."""
    path = prepare_weights(cfg)
    return "none (random initialisation)" if path is None else weights_fingerprint(path)
