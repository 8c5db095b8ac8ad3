"""DP-FedAvg around any strategy's ``aggregate``: the strategy sees one pseudo-client, the noisy mean.

``PrivateAggregate`` clips each kept client's delta, adds the round's Gaussian noise to their sum,
divides by the expected clients per round (``fedsim/privacy.py``), and hands the strategy a single
result whose state is ``global + noisy mean delta``. Whatever the strategy does with a weighted
average of client states (FedAvg takes it, FedMox mixes it with the global state by ``alpha``,
FedProx and FedSTO average the keys that travel) is then post-processing of the DP release, and no
strategy changes. Entries a client may not change keep the global value instead of being trusted:
integer buffers always, BatchNorm running statistics unless clients train them
(``train.client_bn_stats: train``). Noise can push a running variance below zero; it is clamped at
zero (post-processing too).

The noise depends only on (seed, round), so a resumed run draws what the uninterrupted one drew;
epsilon depends only on (q, sigma, rounds, delta), so it needs no state either.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.privacy import clip, epsilon, gaussian_noise, noisy_mean, sampling_rate
from fedsim.types import ClientResult, State

Aggregate = Callable[[State, list[ClientResult], int], State]
BN_STATS = (".running_mean", ".running_var")
PSEUDO_CLIENT = -1


def privatised_keys(update: State, bn_stats_travel: bool) -> list[str]:
    """The entries whose clients' deltas are clipped and noised: float ones a client may change."""
    return [
        k
        for k, v in update.items()
        if np.issubdtype(v.dtype, np.floating) and (bn_stats_travel or not k.endswith(BN_STATS))
    ]


class PrivateAggregate:
    def __init__(self, aggregate: Aggregate, cfg: ExperimentConfig):
        self.aggregate = aggregate
        self.cfg = cfg
        self.p = cfg.privacy
        self.per_round = cfg.clients.per_round
        self.q = sampling_rate(cfg.clients.per_round, cfg.clients.num_clients)
        self.bn_stats_travel = cfg.train.client_bn_stats == "train"

    def __call__(self, global_state: State, results: list[ClientResult], rnd: int) -> tuple[State, dict[str, float]]:
        keys = privatised_keys(results[0].update, self.bn_stats_travel)
        clip_norm = float(self.p.clip_norm)
        clipped, norms = [], []
        for r in results:
            c, norm = clip({k: r.update[k].astype(np.float64) - global_state[k] for k in keys}, clip_norm)
            clipped.append(c)
            norms.append(norm)
        shapes = {k: global_state[k].shape for k in keys}
        noise = gaussian_noise(shapes, self.p.noise_multiplier * clip_norm, self.cfg.seed, rnd)
        mean = noisy_mean(clipped, noise, self.per_round)
        pseudo: State = {}
        for k in results[0].update:
            if k in mean:
                value = global_state[k] + mean[k]
                if k.endswith(".running_var"):
                    value = np.maximum(value, 0.0)
                pseudo[k] = value.astype(global_state[k].dtype)
            else:
                pseudo[k] = global_state[k].copy()
        merged = self.aggregate(global_state, [ClientResult(PSEUDO_CLIENT, rnd, pseudo, 1)], rnd)
        metrics = {"privacy/clipped_fraction": float(np.mean([n > clip_norm for n in norms]))}
        if self.p.noise_multiplier > 0:
            metrics["privacy/epsilon"] = epsilon(self.q, self.p.noise_multiplier, rnd, self.p.delta, self.p.accountant)
        return merged, metrics
