"""Compression and DP through the real engine: short in-process runs of the tiny config on local Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.privacy import epsilon
from tests.test_scale import local_ray, metric_history, simulate, store, tiny  # noqa: F401  (fixtures)

# The small data of tests/test_resume_all.py (cached once per machine), one warm-up epoch.
SMALL = ["data.server_images=8", "data.client_images=8", "data.test_images=4", "train.warmup_epochs=1"]


def rounds_of(out) -> list[dict]:
    return [r for r in out.records if r["event"] == "round" and r["round"] > 0]


@pytest.fixture(scope="module")
def dp_run(local_ray, store, tmp_path_factory):  # noqa: F811
    """A DP run with an uncompressed uplink: DP changes no byte, so it is also the int8 run's baseline."""
    cfg = tiny(*SMALL, "privacy.clip_norm=1.0", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5")
    return simulate(cfg, tmp_path_factory.mktemp("dp") / "run", store)


def test_dp_run_logs_finite_epsilon_growing_with_rounds(dp_run, store):  # noqa: F811
    eps = metric_history(store, dp_run.records[-1]["run_id"], "privacy/epsilon")
    assert len(eps) == 2 and all(math.isfinite(e) for e in eps) and eps[0] < eps[1]
    assert eps == [epsilon(1.0, 1.0, r, 1e-5) for r in (1, 2)]  # 2 of 2 clients per round: q = 1
    assert all(np.isfinite(r["server/box_loss"]) for r in rounds_of(dp_run))


def test_int8_uplink_sends_under_0_30_of_the_uncompressed_bytes(dp_run, store, tmp_path):  # noqa: F811
    int8 = simulate(tiny(*SMALL, "rounds=1", "compression.uplink=int8"), tmp_path / "int8", store)
    plain, (q,) = rounds_of(dp_run)[0], rounds_of(int8)
    assert plain["clients/ok"] == q["clients/ok"] == 2 and plain["bytes_up"] == plain["bytes_down"]
    assert q["bytes_up"] <= 0.30 * plain["bytes_up"], q["bytes_up"] / plain["bytes_up"]
    assert q["bytes_down"] == plain["bytes_down"]  # the global state travels down uncompressed
