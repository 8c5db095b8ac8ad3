"""Virtual clients at scale, and reruns that match whatever order the actors finish in.

The simulations here run in the test process (the driver) against one private local Ray cluster
per module, started as ``fedsim run`` starts it, on the tiny config's cached data and weights.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import psutil
import pytest
import ray

from fedsim.config import ExperimentConfig
from fedsim.preflight import load
from tests.conftest import TINY

# A noop run needs no server training: only the (tiny) evaluation remains per round.
NOOP = ["clients.work=noop", "train.warmup_epochs=0", "train.server_epochs=0"]


@pytest.fixture(scope="module")
def local_ray():
    from fedsim.experiment import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store per module: creating a sqlite store costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def tiny(*overrides: str) -> ExperimentConfig:
    return load(TINY, list(overrides))


def simulate(cfg: ExperimentConfig, run_dir: Path, uri: str, partition_of: ExperimentConfig | None = None):
    """Run ``cfg`` in-process; ``partition_of`` builds the data for another config (e.g. 2 shards for N=1000)."""
    from fedsim.experiment import prepare_data, prepare_weights
    from fedsim.runtime.driver import Simulation

    partition = prepare_data(partition_of or cfg)
    run_dir.mkdir(parents=True)
    sim = Simulation(cfg, run_dir, Path(partition.root), prepare_weights(cfg), uri)
    records, rss, private = [], [], []
    for rec in sim.run():
        records.append(rec)
        if rec["event"] == "round":
            mem = psutil.Process().memory_info()
            rss.append(mem.rss)
            private.append(mem.rss - mem.shared)
    return SimpleNamespace(sim=sim, records=records, rss=rss, private=private, run_dir=run_dir)


def metric_history(uri: str, run_id: str, key: str) -> list[float]:
    client = mlflow.tracking.MlflowClient(uri)
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_thousand_noop_clients_on_a_fixed_pool_keep_the_driver_flat(local_ray, store, tmp_path):
    cfg = tiny(*NOOP, "rounds=4", "clients.num_clients=1000", "clients.sampling_rate=0.05", "clients.max_actors=2")
    out = simulate(cfg, tmp_path / "run", store, partition_of=tiny())  # 2 shards serve 1000 clients
    assert out.records[-1]["event"] == "done"
    rounds = [r for r in out.records if r["event"] == "round" and r["round"] > 0]
    assert [r["clients/ok"] for r in rounds] == [50] * 4 and out.sim.pool_size == 2
    assert out.sim.pool is None  # the run closed its actors
    # the per-client table is an artifact per round, not 1000 metric series
    rows = (out.run_dir / "clients" / "round_0004.csv").read_text().splitlines()
    assert len(rows) == 51 and rows[0].startswith("client_id,profile,status")
    keys = mlflow.tracking.MlflowClient(store).get_run(out.records[-1]["run_id"]).data.metrics
    # a fixed set of run-level series (41 with the drift/* figures), none per client
    assert len(keys) < 50 and not any(k.startswith("client_") for k in keys)
    # Driver memory, round 1 -> 4 (index 0 is the warm-up). Its own (private) pages must stay flat. RSS
    # also counts the object-store pages it has read results from (shared memory, ~50 x 7 MB a round),
    # which the store's allocator may place differently from round to round: bounded, not asserted.
    growth = out.private[-1] / out.private[1] - 1
    trace = f"private {[p >> 20 for p in out.private]} MiB, RSS {[r >> 20 for r in out.rss]} MiB"
    assert growth < 0.05, f"driver private memory grew {growth:.1%} from round 1 to round 4: {trace}"


def test_same_seed_same_run_whatever_order_the_actors_finish(local_ray, store, tmp_path):
    """One actor serves the clients one after the other; two serve them at once, in any order."""
    # shards of 8, 16 and 8 images (2 client domains); a low threshold so the weak tiny model pseudo-labels
    base = ["clients.num_clients=3", "rounds=1", "train.conf_thres=0.001"]
    one = simulate(tiny(*base, "clients.max_actors=1"), tmp_path / "one", store)
    two = simulate(tiny(*base, "clients.max_actors=2"), tmp_path / "two", store)
    assert (one.sim.pool_size, two.sim.pool_size) == (1, 2)
    last_one, last_two = one.records[-2], two.records[-2]
    deterministic = {k for k in last_one if "seconds" not in k and "peak_mem" not in k and k != "event"}
    assert last_one["client/n_pseudo"] > 0 and last_one["clients/ok"] == 3
    assert {k: last_one[k] for k in deterministic} == {k: last_two[k] for k in deterministic}
    a, b = np.load(one.run_dir / "final_state.npz"), np.load(two.run_dir / "final_state.npz")
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_eval_every_scores_every_kth_round_and_the_last(local_ray, store, tmp_path):
    out = simulate(tiny(*NOOP, "rounds=5", "train.eval_every=2"), tmp_path / "run", store)
    run_id = out.records[-1]["run_id"]
    assert len(metric_history(store, run_id, "map50/total")) == 4  # warm-up, rounds 2, 4 and 5 (the last)
    steps = sorted(m.step for m in mlflow.tracking.MlflowClient(store).get_metric_history(run_id, "map50/total"))
    assert steps == [0, 2, 4, 5]
    rounds = [r for r in out.records if r["event"] == "round"]
    assert ["phase_seconds/eval" in r for r in rounds] == [False, False, True, False, True, True]
    assert all(r["phase_seconds/clients"] >= 0 for r in rounds[1:])
