"""Where a round moves the global weights: how far the clients' aggregate moves them, how far the
server's supervised epoch moves them after it, and how much of the clients' move survives.

Every federated method here ends a round with a labeled server epoch, and the clients' pseudo-label
training only counts through what that epoch leaves of it. ``drift/client_kept`` is the round's net
change projected on the clients' change, as a fraction of it: 1 when the server epoch moves at right
angles to the clients, 0 when it takes the clients' move back, below 0 when it overshoots.

Only weights count: BatchNorm statistics and integer buffers are not learned by gradient steps.
``drift/clients`` and ``drift/server`` are relative to the norm of all those weights, which depends
on the head (FedMox holds K copies of its expert layer, with BatchNorm folded into them), so
compare them between rounds and settings of one head; ``drift/cosine`` and ``drift/client_kept``
are scale-free and compare across heads too.
"""

from __future__ import annotations

import math

import numpy as np

from fedsim.runtime.private import privatised_keys
from fedsim.types import State


def _flat(state: State, keys: list[str]) -> np.ndarray:
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in keys])


def round_drift(before: State, aggregated: State, after: State) -> dict[str, float]:
    """``before``: the state sent to the clients; ``aggregated``: after aggregation; ``after``: after
    the server's epochs. Norms are relative to ``before``'s."""
    keys = privatised_keys(before, bn_stats_travel=False)  # float weights, no BatchNorm statistics
    b, m, a = (_flat(s, keys) for s in (before, aggregated, after))
    clients, server = m - b, a - m
    scale = max(float(np.linalg.norm(b)), 1e-12)
    c2 = float(clients @ clients)
    c_norm, s_norm = math.sqrt(c2), float(np.linalg.norm(server))
    cosine = float(clients @ server) / (c_norm * s_norm) if c_norm > 0 and s_norm > 0 else math.nan
    kept = float((a - b) @ clients) / c2 if c2 > 0 else math.nan
    return {
        "drift/clients": c_norm / scale,
        "drift/server": s_norm / scale,
        "drift/cosine": cosine,
        "drift/client_kept": kept,
    }
