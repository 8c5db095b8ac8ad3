"""Device budgets, the virtual clock's straggler cut, and the min_clients quorum."""

from __future__ import annotations

import csv
import re

import mlflow
import pytest

from fedsim.preflight import load
from fedsim.runtime.clock import first_to_finish, job_time
from fedsim.runtime.resources import PROFILES, DeviceProfile, ProfileAssignment
from fedsim.runtime.rounds import TooFewClients
from fedsim.types import ClientResult
from tests.conftest import TINY, run_fedsim
from tests.test_scale import NOOP, local_ray, simulate, store, tiny  # noqa: F401  (fixtures)


def result(cid: int) -> ClientResult:
    return ClientResult(cid, 1, {}, 1)


def test_job_time_is_transfers_plus_work_over_speed():
    rpi = PROFILES["rpi-2gb"]
    t = job_time(rpi, work_images=16, imgsz=640, bytes_down=5e6, bytes_up=1e6, image_cost_s=0.05)
    assert t.down_s == pytest.approx(5e6 * 8 / 50e6) and t.up_s == pytest.approx(1e6 * 8 / 10e6)
    assert t.compute_s == pytest.approx(16 * 0.05 * 4 / 0.15)  # 640 px costs 4x 320 px
    assert t.total_s == pytest.approx(t.down_s + t.compute_s + t.up_s)


def test_first_to_finish_keeps_m_in_time_and_breaks_ties_by_id():
    times = {0: 3.0, 1: 1.0, 2: 1.0, 3: 9.0, 4: 2.0}
    cut = first_to_finish([result(c) for c in (3, 0, 4, 2, 1)], times, wanted=3)
    assert [r.client_id for r in cut.kept] == [1, 2, 4] and [r.client_id for r in cut.stragglers] == [0, 3]
    assert cut.round_sim_s == 2.0
    late = first_to_finish([result(c) for c in times], times, wanted=5, deadline_s=4.0)
    assert [r.client_id for r in late.stragglers] == [3] and late.round_sim_s == 4.0  # waited for the deadline


def test_profiles_mix_round_robin_and_the_pool_reserves_the_most_demanding():
    cfg = load(TINY, ["clients.profiles={big: {num_cpus: 2, memory_gib: 6}}", "clients.profile=[rpi-2gb,big]"])
    assign = ProfileAssignment.from_config(cfg.clients)
    assert [assign.name_of(c) for c in range(4)] == ["rpi-2gb", "big", "rpi-2gb", "big"]
    assert assign.of(1) == DeviceProfile(num_cpus=2, num_gpus=0, memory_gib=6)
    pool = assign.pool_profile()
    assert (pool.num_cpus, pool.memory_gib) == (2, 6)


def test_over_budget_job_is_a_failure_not_a_crash(tmp_path):
    # Real client actors (fresh processes, as on a device): client 0 has a 1 MiB budget, client 1 not.
    sets = ["rounds=1", "clients.profiles={tiny-ram: {memory_gib: 0.001}}", "clients.profile=[tiny-ram,cpu-1]"]
    out = run_fedsim(["run", str(TINY), *sum((["--set", s] for s in sets), [])], cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"client 0 failed: device budget exceeded: \d+ MiB > 1 MiB", out.stdout), out.stdout[-2000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tiny"]).iloc[0]
    assert run["status"] == "FINISHED"
    assert run["metrics.clients/failed"] == 1 and run["metrics.clients/ok"] == 1


def test_deadline_and_over_selection_cut_stragglers_on_the_virtual_clock(local_ray, store, tmp_path):  # noqa: F811
    # Links: cpu-1 1000/1000 Mbit/s, wifi 100/100, rpi-2gb 50 down / 10 up. A noop client computes
    # nothing, so its simulated time is its transfers alone: about 0.1 s, 1.1 s and 6.7 s here.
    cfg = tiny(
        *NOOP,
        "rounds=2",
        "clients.num_clients=6",
        "clients.sampling_rate=0.5",  # m = 3 ...
        "clients.over_selection=2",  # ... of 6 sampled
        "clients.deadline_s=5",
        "clients.profiles={wifi: {up_mbps: 100, down_mbps: 100}}",
        "clients.profile=[cpu-1,wifi,rpi-2gb]",
    )
    out = simulate(cfg, tmp_path / "run", store)
    rounds = [r for r in out.records if r["event"] == "round" and r["round"] > 0]
    for rec in rounds:
        assert (rec["clients/selected"], rec["clients/ok"], rec["clients/stragglers"]) == (6, 3, 3)
        nbytes = rec["bytes_down"] / 6
        assert rec["round_sim_seconds"] == pytest.approx(2 * nbytes * 8 / 100e6)  # the wifi clients' time
        assert rec["round_seconds"] > 0
    with (out.run_dir / "clients" / "round_0002.csv").open() as f:
        rows = {int(r["client_id"]): r for r in csv.DictReader(f)}
    # first three in time: cpu-1 clients 0 and 3, then wifi 1 before wifi 4 (a tie, by id); rpi past the deadline
    assert {c: r["status"] for c, r in rows.items()} == {
        0: "ok",
        1: "ok",
        2: "straggler",
        3: "ok",
        4: "straggler",
        5: "straggler",
    }
    assert float(rows[2]["sim_seconds"]) > 5 and rows[2]["profile"] == "rpi-2gb"
    artifacts = mlflow.tracking.MlflowClient(store).list_artifacts(out.records[-1]["run_id"], "clients")
    assert [a.path for a in artifacts] == ["clients/round_0001.csv", "clients/round_0002.csv"]


def test_too_few_clients_aborts_after_the_last_good_checkpoint(local_ray, store, tmp_path):  # noqa: F811
    # clients 0 and 2 (cpu-1) answer within the 1 s deadline, client 1 (rpi-2gb) cannot
    profiles = ["clients.profile=[cpu-1,rpi-2gb]", "clients.deadline_s=1"]
    cfg = tiny(*NOOP, *profiles, "clients.num_clients=3", "clients.min_clients=3")
    with pytest.raises(TooFewClients, match=r"^round 1: only 2 of 3 clients answered, below clients.min_clients=3$"):
        simulate(cfg, tmp_path / "run", store)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["round_0000.pt"]
    mlflow.set_tracking_uri(store)
    run = mlflow.search_runs(experiment_names=["tiny"], filter_string=f"tags.run_dir = '{tmp_path / 'run'}'")
    assert list(run["status"]) == ["FAILED"]


def test_progress_line_names_failed_and_straggling_clients():
    from fedsim.experiment import format_round

    rec = {"round": 2, "map50/a": 0.5, "map50/total": 0.5, "round_seconds": 1.0, "clients/ok": 3}
    line = format_round({**rec, "clients/failed": 1, "clients/stragglers": 2}, ["a"], 5)
    assert line.startswith("round 2/5") and "clients 3 ok 1 failed 2 stragglers" in line
    assert "failed" not in format_round({**rec, "clients/failed": 0, "clients/stragglers": 0}, ["a"], 5)
