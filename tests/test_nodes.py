"""Per-node pool placement, the per-node storage probe and the storage root, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim import storage
from fedsim.runtime.nodes import _problems
from fedsim.runtime.resources import DeviceProfile, place_pool

CPU1 = DeviceProfile(num_cpus=1, num_gpus=0, memory_gib=2.0)
QUARTER = DeviceProfile(num_cpus=1, num_gpus=0.25, memory_gib=4.0)
GIB = 2**30


def test_pool_is_sized_per_node_not_from_cluster_totals():
    # 1.5 free CPUs on each node: 3 cluster-wide, but only one cpu-1 actor fits on each
    nodes = {"b": {"CPU": 1.5, "memory": 64 * GIB}, "a": {"CPU": 1.5, "memory": 64 * GIB}}
    assert place_pool(CPU1, nodes, wanted=10) == ["a", "b"]


def test_pool_spreads_over_nodes_and_respects_wanted_and_cap():
    nodes = {"a": {"CPU": 4, "memory": 64 * GIB}, "b": {"CPU": 2, "memory": 64 * GIB}}
    assert place_pool(CPU1, nodes, wanted=3) == ["a", "b", "a"]
    assert place_pool(CPU1, nodes, wanted=10) == ["a", "b", "a", "b", "a", "a"]
    assert place_pool(CPU1, nodes, wanted=10, cap=2) == ["a", "b"]


def test_gpu_fractions_and_memory_bound_each_node():
    nodes = {
        "gpu": {"CPU": 16, "GPU": 1, "memory": 64 * GIB},  # 4 quarters
        "small": {"CPU": 16, "GPU": 1, "memory": 9 * GIB},  # memory: 2 actors of 4 GiB
        "cpu-only": {"CPU": 16, "memory": 64 * GIB},  # no GPU: none
    }
    slots = place_pool(QUARTER, nodes, wanted=100)
    assert slots.count("gpu") == 4 and slots.count("small") == 2 and "cpu-only" not in slots


def test_no_room_anywhere_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no client actor fits"):
        place_pool(QUARTER, {"a": {"CPU": 8, "memory": 64 * GIB}}, wanted=2)


def test_storage_probe_names_what_a_node_cannot_reach(tmp_path: Path):
    readable = tmp_path / "partition.json"
    readable.write_text("{}")
    assert _problems([str(readable)], str(tmp_path / "runs")) == []
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())  # probe removed
    blocked = tmp_path / "file"
    blocked.write_text("")
    found = _problems([str(tmp_path / "missing.pt")], str(blocked / "runs"))
    assert found[0].startswith(f"cannot read {tmp_path / 'missing.pt'}")
    assert found[1].startswith(f"cannot write {blocked / 'runs'}")


def test_relative_paths_live_under_the_storage_root(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FEDSIM_CACHE", raising=False)
    monkeypatch.setenv("FEDSIM_STORAGE", str(tmp_path))
    assert storage.resolve("runs") == tmp_path / "runs"
    assert storage.resolve("/abs/x") == Path("/abs/x")
    assert storage.cache_dir() == tmp_path / "data" / "cache"
    # inside a Ray job, never the job's working-dir copy: ~/fedsim unless FEDSIM_STORAGE says otherwise
    monkeypatch.delenv("FEDSIM_STORAGE")
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.storage_root() == tmp_path / "home" / "fedsim"
    monkeypatch.delenv("RAY_JOB_ID")
    monkeypatch.chdir(tmp_path)
    assert storage.storage_root() == tmp_path
