"""``fedsim ui`` stops the MLflow server and all its workers when it is told to stop."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import fedsim_env

FEDSIM = str(Path(sys.executable).parent / "fedsim")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(condition, timeout: float, what: str, ui: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if ui.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} (fedsim ui exit {ui.poll()}); stderr:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_signal_stops_server_and_workers(sig: signal.Signals, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stderr.log"
    lines: list[str] = []
    server_pid: list[int] = []
    processes: list[psutil.Process] = []
    with log.open("w") as err:
        ui = subprocess.Popen(
            [FEDSIM, "ui", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(port)],
            env=fedsim_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )

    def drain() -> None:  # keeps reading so that no writer ever blocks on a full pipe
        for line in ui.stdout:
            lines.append(line)
            found = re.search(r"\(pid (\d+)\)", line)
            if found and not server_pid:
                server_pid.append(int(found.group(1)))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_for(lambda: bool(server_pid), 60, "no '(pid N)' line on stdout", ui, log)
        wait_for(lambda: port_open(port), 60, f"MLflow UI not listening on {port}", ui, log)
        server = psutil.Process(server_pid[0])
        processes = [server, *server.children(recursive=True)]
        assert len(processes) >= 2, f"expected the server and its uvicorn worker, got {processes}"
        assert server.ppid() == ui.pid
        assert {p.pid for p in processes if alive(p)} == {p.pid for p in processes}

        ui.send_signal(sig)
        assert ui.wait(timeout=30) == 0, log.read_text()[-4000:]
        left = [p for p in processes if alive(p)]
        assert not left, f"left running after {sig.name}: {left}"
        assert not port_open(port)
        reader.join(timeout=10)  # EOF: no process still holds fedsim's stdout
        assert not reader.is_alive()
        assert f"{sig.name}, stopping the MLflow UI (pid {server.pid})" in log.read_text()
    finally:
        for process in processes:  # only what this test started
            try:
                process.kill()
            except psutil.Error:
                pass
        if ui.poll() is None:
            ui.kill()
        ui.wait(timeout=30)
