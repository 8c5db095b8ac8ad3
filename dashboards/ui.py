"""``launch_ui`` / ``stop_ui``: the MLflow UI on loopback, in its small form (one worker, no job runner).

Measured here: the default ``mlflow server`` starts 15 processes (3.3 GB, 11 s); with
``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` it is 2 processes (538 MiB,
5.5 s). The server runs in its own session and process group, so a terminal's Ctrl-C or hang-up
does not reach it directly: :func:`stop_ui` signals the whole group, then kills what remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedsim.tracking import resolve_uri


def ui_command(tracking_uri: str, port: int) -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
    return prog + [
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def launch_ui(tracking_uri: str | None = None, port: int = 5000) -> subprocess.Popen:
    """Start ``mlflow ui`` for ``tracking_uri`` (default: fedsim's) on 127.0.0.1:``port``."""

    uri = resolve_uri(tracking_uri)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(ui_command(uri, port), env=env, start_new_session=True)
    print(f"MLflow UI for {uri}: http://127.0.0.1:{port}  (pid {proc.pid})", flush=True)
    return proc


def stop_ui(
    proc: subprocess.Popen,
    sig: int = signal.SIGTERM,
    timeout: float = 30.0,
    hurry: Callable[[], bool] = lambda: False,
) -> None:
    """Stop a server started by :func:`launch_ui` together with every process of its group.

    Sends ``sig`` to the group and waits up to ``timeout`` seconds for the server and its
    descendants to exit; then, or as soon as ``hurry()`` is true (a second Ctrl-C), sends
    SIGKILL. Returns once the server is reaped; a no-op when nothing is left.
    """
    members = _descendants(proc.pid)
    _signal_group(proc.pid, sig)
    if not _wait_gone(proc, members, timeout, hurry):
        _signal_group(proc.pid, signal.SIGKILL)
        for member in members:  # a descendant that left the group (setsid) misses the group's signal
            try:
                member.kill()
            except psutil.Error:
                pass
        _wait_gone(proc, members, 10.0, lambda: False)
    proc.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone, or holds only processes no longer ours to signal


def _running(process: psutil.Process) -> bool:
    # A zombie has exited; whether its new parent reaps it is not ours to wait for.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(
    proc: subprocess.Popen, members: list[psutil.Process], timeout: float, hurry: Callable[[], bool]
) -> bool:
    """Whether the server and ``members`` all exit within ``timeout`` seconds (False at once on ``hurry()``)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None or any(_running(m) for m in members):
        if hurry() or time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
