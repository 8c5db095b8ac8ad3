"""How a round's weight change splits between the clients' aggregate and the server's epoch."""

import math

import numpy as np
import pytest

from fedsim.runtime.drift import round_drift


def _state(w: list[float], running_mean: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "head.w": np.array(w, np.float32),
        "head.bn.running_mean": np.array([running_mean], np.float32),
        "head.bn.num_batches_tracked": np.array(7, np.int64),
    }


def test_server_taking_half_the_clients_move_back():
    before, aggregated, after = _state([3.0, 4.0]), _state([3.0, 5.0]), _state([3.0, 4.5])
    d = round_drift(before, aggregated, after)
    assert d["drift/clients"] == pytest.approx(1 / 5)  # |(0, 1)| / |(3, 4)|
    assert d["drift/server"] == pytest.approx(0.5 / 5)
    assert d["drift/cosine"] == pytest.approx(-1.0)
    assert d["drift/client_kept"] == pytest.approx(0.5)


def test_server_move_at_right_angles_keeps_the_clients_move():
    d = round_drift(_state([3.0, 4.0]), _state([3.0, 5.0]), _state([5.0, 5.0]))
    assert d["drift/cosine"] == pytest.approx(0.0)
    assert d["drift/client_kept"] == pytest.approx(1.0)


def test_statistics_and_integer_buffers_do_not_count():
    # BatchNorm statistics move a lot on the server epoch; they are not learned weights
    d = round_drift(_state([3.0, 4.0], 0.0), _state([3.0, 5.0], 10.0), _state([3.0, 4.5], -10.0))
    assert d["drift/clients"] == pytest.approx(0.2) and d["drift/client_kept"] == pytest.approx(0.5)


def test_clients_that_moved_nothing_have_no_share_to_keep():
    d = round_drift(_state([3.0, 4.0]), _state([3.0, 4.0]), _state([3.0, 4.5]))
    assert d["drift/clients"] == 0.0 and math.isnan(d["drift/cosine"]) and math.isnan(d["drift/client_kept"])
