"""Client-level DP-FedAvg: clipping, the noise's scale and seeding, the accountant, and refused configs."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest

from fedsim.config import ConfigError
from fedsim.preflight import load
from fedsim.privacy import calibrate_noise, clip, epsilon, gaussian_noise, l2_norm
from fedsim.runtime.private import PrivateAggregate
from fedsim.types import ClientResult
from tests.conftest import TINY

GLOBAL = {
    "model.10.conv.weight": np.zeros((64, 32, 3, 3), np.float32),
    "model.10.bn.running_var": np.ones(64, np.float32),
    "model.10.bn.num_batches_tracked": np.array(3, np.int64),
}


def cfg(*overrides: str):
    return load(TINY, ["privacy.clip_norm=1.0", "clients.num_clients=4", "clients.sampling_rate=0.5", *overrides])


def client(cid: int, scale: float) -> ClientResult:
    rng = np.random.default_rng(cid)
    update = {k: (v + scale * rng.normal(0, 1, v.shape)).astype(v.dtype) for k, v in GLOBAL.items() if v.ndim}
    return ClientResult(cid, 1, {**update, "model.10.bn.num_batches_tracked": np.array(99)}, 10)


def seen_by_strategy(config, results, rnd=1):
    """The pseudo-client the wrapped ``aggregate`` receives, and the wrapper's metrics."""
    got = []
    wrapper = PrivateAggregate(lambda g, rs, r: got.append(rs) or dict(g), config)
    _, metrics = wrapper(GLOBAL, results, rnd)
    (only,) = got[0]
    return only.update, metrics


def test_every_client_is_clipped_to_the_bound():
    rng = np.random.default_rng(0)
    for scale in (1e-4, 0.01, 1.0, 100.0):
        delta = {"a": rng.normal(0, scale, (50, 3)), "b": rng.normal(0, scale, 7)}
        clipped, norm = clip(delta, 1.0)
        assert l2_norm(clipped) <= 1.0 + 1e-12 and norm == pytest.approx(l2_norm(delta))
        if norm <= 1.0:
            assert all(np.array_equal(clipped[k], delta[k]) for k in delta)
    # through the wrapper, without noise: the mean of the clipped deltas over m = 2 clients per round
    results = [client(1, 1.0), client(2, 1e-5)]
    update, metrics = seen_by_strategy(cfg(), results)
    key = "model.10.conv.weight"
    expected = sum(clip({key: r.update[key] - GLOBAL[key]}, 1.0)[0][key] for r in results) / 2
    assert np.allclose(update[key], expected, atol=1e-7)
    assert metrics == {"privacy/clipped_fraction": 0.5}  # no noise, no epsilon
    # frozen BN statistics and integer counters keep the global value (clients may not change them)
    assert np.array_equal(update["model.10.bn.running_var"], GLOBAL["model.10.bn.running_var"])
    assert update["model.10.bn.num_batches_tracked"] == 3


def test_noise_has_std_sigma_c_and_depends_on_seed_and_round_only():
    shapes = {"w": (400, 500)}
    std = 1.5 * 0.7  # sigma * C
    draw = gaussian_noise(shapes, std, seed=0, rnd=3)["w"]
    assert draw.std() == pytest.approx(std, rel=0.02) and abs(draw.mean()) < 0.01
    assert np.array_equal(draw, gaussian_noise(shapes, std, seed=0, rnd=3)["w"])
    assert not np.array_equal(draw, gaussian_noise(shapes, std, seed=0, rnd=4)["w"])
    assert not np.array_equal(draw, gaussian_noise(shapes, std, seed=1, rnd=3)["w"])
    # added once to the sum: clients that send nothing new leave noise of std sigma C / m in the mean
    config = cfg("privacy.noise_multiplier=2.0")
    update, metrics = seen_by_strategy(config, [client(1, 0.0), client(2, 0.0)], rnd=2)
    noise = update["model.10.conv.weight"].astype(np.float64)
    assert noise.std() == pytest.approx(2.0 * 1.0 / 2, rel=0.03)
    assert metrics["privacy/epsilon"] == epsilon(0.5, 2.0, 2, 1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_the_accountants_own(accountant):
    q, sigma, steps, delta = 0.1, 1.1, 20, 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    own = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    assert epsilon(q, sigma, steps, delta, accountant) == pytest.approx(own.compose(event).get_epsilon(delta))
    assert epsilon(q, sigma, 5, delta, accountant) < epsilon(q, sigma, steps, delta, accountant)
    assert epsilon(q, 0.0, steps, delta) == float("inf") and epsilon(q, sigma, 0, delta) == 0.0


@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibrated_noise_meets_the_target_epsilon_tightly(target):
    q, rounds, delta = 0.1, 5, 1e-5
    sigma = calibrate_noise(q, rounds, target, delta)
    assert epsilon(q, sigma, rounds, delta) <= target < epsilon(q, sigma * 0.999, rounds, delta)
    assert epsilon(q, sigma, rounds, delta, "pld") < target  # PLD is tighter for the same sigma
    # more rounds spend more: the same target needs more noise
    assert calibrate_noise(q, 2 * rounds, target, delta) > sigma


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["privacy.noise_multiplier=1.0"], "privacy.noise_multiplier=1.0 needs privacy.clip_norm"),
        (["privacy.clip_norm=1.0", "clients.num_clients=1"], "a single client sampled every round"),
        (["privacy.clip_norm=1.0", "privacy.delta=0.5"], "privacy.delta=0.5 must be below 1/clients.num_clients"),
        (["privacy.clip_norm=1.0", "strategy.name=server_only"], "strategy server_only trains no clients"),
        (
            ["privacy.clip_norm=1.0", "strategy.name=fedmox", "strategy.params.usage_weighting=true"],
            "usage_weighting=true",
        ),
        (["privacy.clip_norm=0"], "privacy.clip_norm Input should be greater than 0"),
    ],
)
def test_invalid_combinations_are_refused_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load(TINY, overrides)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: config error: ") and expected in lines[0]


def test_sweep_table_keeps_epsilon_and_privacy_epsilon_can_be_an_objective():
    from types import SimpleNamespace

    from sweeps.config import SweepFile
    from sweeps.results import best_trial, spent_epsilon, trial_table

    def result(tid: str, map50: float, eps: float) -> SimpleNamespace:
        metrics = {"trial_id": tid, "training_iteration": 3, "map50/total": map50, "privacy/epsilon": eps}
        return SimpleNamespace(metrics=metrics, path=f"/x/trial_{tid}", error=None, config={"train.lr": 0.1})

    grid = [result("a", 0.4, 2.0), result("b", 0.5, 8.0), result("c", 0.3, 1.0)]
    table = trial_table(grid, ["train.lr"], ["map50/total"], max_rounds=3)
    best = best_trial(table, ["map50/total"], ["max"])
    assert best["trial_id"] == "b" and spent_epsilon(best) == 8.0
    both = trial_table(grid, ["train.lr"], ["map50/total", "privacy/epsilon"], max_rounds=3)
    front = best_trial(both, ["map50/total", "privacy/epsilon"], ["max", "min"])
    assert front["trial_id"] == "b" and list(both.columns).count("privacy/epsilon") == 1
    spec = {"name": "s", "base": "tiny.yaml", "num_samples": 2, "space": {}}
    spec["objectives"] = [["map50/total", "max"], ["privacy/epsilon", "min"]]
    assert SweepFile.model_validate(spec).objectives[1] == ("privacy/epsilon", "min")


def test_fedmox_mixes_the_noisy_mean_without_knowing_about_dp():
    from strategies import build

    config = cfg("strategy.name=fedmox", "strategy.params.alpha=0.5", "privacy.noise_multiplier=0.5")
    results = [client(1, 1.0), client(2, 0.01)]
    fedavg_view, _ = seen_by_strategy(config, results)
    merged, metrics = PrivateAggregate(build(config).aggregate, config)(GLOBAL, results, 1)
    key = "model.10.conv.weight"
    assert np.allclose(merged[key], 0.5 * GLOBAL[key] + 0.5 * fedavg_view[key], atol=1e-7)
    assert merged["model.10.bn.num_batches_tracked"] == 3 and "privacy/epsilon" in metrics


def test_progress_line_shows_the_privacy_spent():
    from fedsim.experiment import format_round

    rec = {"round": 2, "map50/a": 0.5, "map50/total": 0.5, "round_seconds": 1.0, "clients/ok": 2}
    assert "epsilon 4.73" in format_round({**rec, "privacy/epsilon": 4.7285}, ["a"], 5)
    assert "epsilon" not in format_round(rec, ["a"], 5)
