import numpy as np
import pytest

from fedsim.config import ExperimentConfig
from fedsim.types import ClientResult
from strategies import UnknownStrategyError, build, get
from strategies.base import mix, weighted_average


def result(cid, n, **arrays):
    return ClientResult(cid, 1, {k: np.asarray(v) for k, v in arrays.items()}, n)


def test_fedavg_is_sample_weighted_over_sent_keys_only():
    strategy = build(ExperimentConfig())
    w0 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    w1 = np.array([[5.0, 6.0], [7.0, 8.0]], np.float32)
    global_state = {
        "w": np.zeros((2, 2), np.float32),
        "frozen_here": np.ones(3, np.float32),
        "bn.num_batches_tracked": np.array(10, np.int64),
    }
    results = [
        result(0, 1, w=w0, **{"bn.num_batches_tracked": np.array(12, np.int64)}),
        result(1, 3, w=w1, **{"bn.num_batches_tracked": np.array(15, np.int64)}),
    ]
    out = strategy.aggregate(global_state, results, rnd=1)
    np.testing.assert_allclose(out["w"], (w0 * 1 + w1 * 3) / 4)
    assert out["w"].dtype == np.float32
    assert np.array_equal(out["frozen_here"], global_state["frozen_here"])  # not sent -> unchanged
    assert out["bn.num_batches_tracked"] == 15 and out["bn.num_batches_tracked"].dtype == np.int64


def test_weighted_average_and_mix_by_hand():
    a = {"x": np.array([0.0, 10.0]), "n": np.array(1)}
    b = {"x": np.array([4.0, 2.0]), "n": np.array(5)}
    np.testing.assert_allclose(weighted_average([a, b], [3, 1])["x"], [1.0, 8.0])
    np.testing.assert_allclose(mix(a, b, 0.25)["x"], [3.0, 4.0])
    assert mix(a, b, 0.25)["n"] == 1  # integer buffers copied, not mixed
    with pytest.raises(ValueError):
        weighted_average([a, b], [0, 0])
    with pytest.raises(ValueError):
        mix(a, b, 1.5)


def test_sampling_is_seeded_and_respects_rate():
    cfg = ExperimentConfig.model_validate({"clients": {"num_clients": 9, "sampling_rate": 0.33}})
    strategy = build(cfg)
    picks = [strategy.sample_clients(t, 9, np.random.default_rng([0, t])) for t in range(1, 6)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert picks == [strategy.sample_clients(t, 9, np.random.default_rng([0, t])) for t in range(1, 6)]
    assert len({tuple(p) for p in picks}) > 1


def test_registry_names_valid_strategies():
    with pytest.raises(UnknownStrategyError, match="valid: .*fedavg"):
        get("fedmagic")
