"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): clipping, noise, accounting.

Threat model. An observer of the sequence of global models (anyone the server publishes them to,
or a client that receives them) should not learn whether a given client took part, i.e. anything
specific to one client's whole unlabeled shard. The server is trusted: it sees the clipped updates
and adds the noise itself. The server's own labeled set is the server's, not a client's, so its
supervised epoch after aggregation is neither clipped nor noised (it is post-processing of a DP
release plus non-private data of the party that runs it). What the guarantee does not cover: the
per-client figures the simulator logs for the experimenter (losses, pseudo-label and routing counts,
bytes, peak memory) and the integer BatchNorm batch counters, which keep the global value.

Mechanism, each round: every kept client's float delta (client state minus the global state it
received) is scaled to L2 norm at most ``C``; the server sums them, adds N(0, (sigma C)^2) to every
coordinate of the sum and divides by the expected number of clients per round m (a fixed
denominator, so one client moves the result by at most C / m whether or not others dropped out).

Accounting: each round is a Poisson-subsampled Gaussian mechanism with sampling rate q = m / N and
noise multiplier sigma, composed over the rounds run so far (Google's ``dp_accounting``, RDP or PLD).
fedsim samples exactly m clients without replacement; accounting it as Poisson sampling at the same
rate is the usual approximation (McMahan et al. 2018, TensorFlow Federated).
"""

from __future__ import annotations

import contextlib
import math

import dp_accounting
import numpy as np
from absl import logging as absl_logging

from fedsim.config import ExperimentConfig, PrivacyConfig
from fedsim.types import State

NOISE_STREAM = 4  # beside derive_seed's 1..3: the noise draws their own stream of (seed, round)


def enabled(p: PrivacyConfig) -> bool:
    return p.clip_norm is not None


def l2_norm(delta: State) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))


def clip(delta: State, clip_norm: float) -> tuple[State, float]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` (float64), and its norm before clipping."""
    norm = l2_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.astype(np.float64) * factor for k, v in delta.items()}, norm


def gaussian_noise(shapes: dict[str, tuple[int, ...]], std: float, seed: int, rnd: int) -> State:
    """N(0, std^2) per coordinate, drawn in ``shapes`` order from a generator of (seed, round) only."""
    rng = np.random.default_rng([seed, rnd, NOISE_STREAM])
    return {k: rng.normal(0.0, std, size=shape) for k, shape in shapes.items()}


def noisy_mean(clipped: list[State], noise: State, denominator: float) -> State:
    """(sum of the clipped deltas + noise) / denominator, per entry, float64."""
    out = {}
    for key, n in noise.items():
        out[key] = (sum(c[key] for c in clipped) + n) / denominator
    return out


def sampling_rate(per_round: int, num_clients: int) -> float:
    return per_round / num_clients


def _event(q: float, noise_multiplier: float, rounds: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
    )


def _accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    return dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()


@contextlib.contextmanager
def _quiet_accountant():
    # RDP orders close to 1 may not converge at large q; the accountant drops them with a warning each.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent after ``rounds`` Poisson-subsampled Gaussian rounds, at ``delta``."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with _quiet_accountant():
        return float(_accountant(accountant).compose(_event(q, noise_multiplier, rounds)).get_epsilon(delta))


def calibrate_noise(q: float, rounds: int, target_epsilon: float, delta: float) -> float:
    """The noise multiplier whose RDP ``epsilon(q, sigma, rounds, delta)`` is ``target_epsilon`` or just below.

    ``dp_accounting.calibrate_dp_mechanism`` (bracketing, then bisection over sigma with the RDP
    accountant recomputed at each step; sigma to within 1e-5, on the side that meets the target).
    RDP only: the PLD accountant's bracketing tries tiny sigmas whose PLDs do not fit in memory.
    PLD's epsilon for the same sigma is smaller (tighter), so the sigma meets the target under both.
    """
    if rounds <= 0:
        raise ValueError("calibrating the noise needs at least one round")
    with _quiet_accountant():
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant("rdp"),
            lambda s: _event(q, s, rounds),
            target_epsilon,
            delta,
            tol=1e-5,
        )
    return float(sigma)


def config_problems(cfg: ExperimentConfig, uses_clients: bool) -> list[str]:
    """Privacy settings that cannot give the guarantee they ask for, one line each."""
    p, c = cfg.privacy, cfg.clients
    problems = []
    if p.noise_multiplier > 0 and p.clip_norm is None:
        problems.append(
            f"privacy.noise_multiplier={p.noise_multiplier} needs privacy.clip_norm: the noise is scaled to the "
            "clipping bound, and an unclipped update has no bound"
        )
    if not enabled(p):
        return problems
    if not uses_clients:
        problems.append(
            f"privacy.clip_norm: strategy {cfg.strategy.name} trains no clients; there is nothing to privatise"
        )
    if c.num_clients == 1:
        problems.append(
            "privacy: a single client sampled every round (clients.num_clients=1): the guarantee would cover that "
            "client's whole data, i.e. all the client signal there is, and noise of std noise_multiplier * clip_norm "
            "on its one clipped update swamps it; use more clients or no privacy"
        )
    elif p.delta >= 1 / c.num_clients:
        problems.append(
            f"privacy.delta={p.delta} must be below 1/clients.num_clients = {1 / c.num_clients:.3g}: "
            "a delta of 1/N allows one client's data to be revealed outright"
        )
    if cfg.strategy.params.get("usage_weighting"):
        problems.append(
            "privacy with strategy.params.usage_weighting=true: expert weights would use each client's routing "
            "counts, which the DP mechanism does not cover; set usage_weighting: false"
        )
    return problems
