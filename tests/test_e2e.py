"""End to end through the real CLI: `fedsim run configs/tiny.yaml` on a private local Ray cluster."""

from __future__ import annotations

import ipaddress
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import psutil
import pytest

from tests.conftest import TINY, run_fedsim

STRACE = shutil.which("strace")


def own_addresses() -> set[ipaddress._BaseAddress]:
    return {
        ipaddress.ip_address(a.address.split("%")[0])
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family.name in ("AF_INET", "AF_INET6")
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run, traced for connect() calls when strace is installed."""
    cwd = tmp_path_factory.mktemp("tiny")
    trace = cwd / "connect.trace"
    # -yy prints each socket's protocol (TCP/UDP/UNIX) next to its fd, which is how TCP
    # connects are told apart from Ray's UDP route lookups (a UDP connect sends nothing).
    prefix = [STRACE, "-f", "-qq", "-yy", "-e", "trace=connect", "-o", str(trace)] if STRACE else None
    result = run_fedsim(["run", str(TINY)], cwd=cwd, timeout=900, prefix=prefix)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = next((cwd / "runs").glob("tiny-fedavg-*"))
    return SimpleNamespace(
        cwd=cwd, out=result.stdout, run_dir=run_dir, trace=trace, uri=f"sqlite:///{cwd / 'runs' / 'mlflow.db'}"
    )


def final_metrics(uri: str, run_dir: Path) -> dict[str, float]:
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"], filter_string=f"tags.run_dir = '{run_dir}'")
    assert len(runs) == 1
    return {
        k: v
        for k, v in runs.iloc[0].items()
        if k.startswith("metrics.") and not any(w in k for w in ("seconds", "peak_mem"))
    }


def test_progress_lines_mlflow_records_and_checkpoints(tiny_run):
    domains = ["cloudy", "rainy", "snowy"]
    lines = [line for line in tiny_run.out.splitlines() if line.startswith(("warm-up", "round"))]
    assert len(lines) == 3
    for line in lines:
        assert all(re.search(rf"{d} \d\.\d{{3}}", line) for d in domains) and re.search(r"\d+\.\ds$", line)

    # the default store: sqlite under the working directory
    mlflow.set_tracking_uri(tiny_run.uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.strategy"] == "fedavg" and run["tags.seed"] == "0" and len(run["tags.git_commit"]) >= 7
    assert run["params.clients.num_clients"] == "2" and run["params.strategy.name"] == "fedavg"
    client = mlflow.tracking.MlflowClient(tiny_run.uri)
    for key in [*(f"map50/{d}" for d in domains), "map50/total", "map/total"]:
        assert sorted(m.step for m in client.get_metric_history(run.run_id, key)) == [0, 1, 2], key
    for key in [
        "client/n_pseudo",
        "client/peak_mem_mib",
        "bytes_up",
        "bytes_down",
        "round_seconds",
        "server/box_loss",
        "clients/ok",
        *(f"phase_seconds/{p}" for p in ("clients", "aggregate", "server", "eval", "record")),
    ]:
        assert sorted(m.step for m in client.get_metric_history(run.run_id, key)) == (
            [0, 1, 2] if key in ("round_seconds", "server/box_loss", "phase_seconds/record") else [1, 2]
        ), key
    assert client.get_metric_history(run.run_id, "clients/ok")[-1].value == 2
    # every federated round says how much of the clients' move the server's epoch left
    kept = client.get_metric_history(run.run_id, "drift/client_kept")
    assert sorted(m.step for m in kept) == [1, 2] and all(math.isfinite(m.value) for m in kept)
    assert all(m.value > 0 for m in client.get_metric_history(run.run_id, "drift/clients"))
    assert client.get_metric_history(run.run_id, "bytes_up")[-1].value > 1e6  # neck + head, float32
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.yaml", "final_state.npz", "rounds.csv"} <= artifacts

    ckpts = sorted(p.name for p in (tiny_run.run_dir / "checkpoints").glob("*.pt"))
    assert ckpts == ["round_0000.pt", "round_0001.pt", "round_0002.pt"]


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (the Makefile installs Debian's strace)")
def test_no_tcp_connection_leaves_the_machine(tiny_run):
    allowed = own_addresses()
    seen, outside = 0, []
    pattern = re.compile(
        r"connect\(\d+<(TCP|TCPv6|UDP|UDPv6|UNIX)[^>]*>, \{sa_family=(AF_INET6?),.*?"
        r'(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")'
    )
    for line in tiny_run.trace.read_text().splitlines():
        m = pattern.search(line)
        if not m or m.group(1) not in ("TCP", "TCPv6"):
            continue  # AF_UNIX sockets, and UDP "connects" that only pick a route
        seen += 1
        addr = ipaddress.ip_address(m.group(3) or m.group(4))
        if getattr(addr, "ipv4_mapped", None):
            addr = addr.ipv4_mapped
        if not (addr.is_loopback or addr in allowed or addr.is_unspecified):
            outside.append(line)
    assert seen > 10, "the trace saw no TCP connects at all: is strace tracing the Ray processes?"
    assert not outside, "\n".join(outside[:10])


def test_resume_after_stop_matches_uninterrupted_run(tiny_run, tmp_path):
    keep = ["--set", "tracking.keep_checkpoints=1"]  # resuming needs the newest checkpoint only
    first = run_fedsim(["run", str(TINY), "--stop-after", "1", *keep], cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after round 1" in first.stdout
    run_dir = next((tmp_path / "runs").glob("tiny-fedavg-*"))
    assert [p.name for p in (run_dir / "checkpoints").glob("*.pt")] == ["round_0001.pt"]
    second = run_fedsim(["run", str(TINY), "--resume", *keep], cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "after round 1" in second.stdout and "warm-up" not in second.stdout
    assert next((tmp_path / "runs").glob("tiny-fedavg-*")) == run_dir  # same run continued
    assert [p.name for p in (run_dir / "checkpoints").glob("*.pt")] == ["round_0002.pt"]

    resumed = final_metrics(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", run_dir)
    straight = final_metrics(tiny_run.uri, tiny_run.run_dir)
    assert resumed.keys() == straight.keys() and resumed == straight
    a, b = np.load(run_dir / "final_state.npz"), np.load(tiny_run.run_dir / "final_state.npz")
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
