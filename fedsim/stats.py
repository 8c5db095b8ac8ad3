"""Paired comparison of two methods over seeds: mean difference, Student-t CI and two-sided p-value.

Run i of method a and run i of method b share seed i (same data split, client sampling and init),
so the per-seed differences ``a_i - b_i`` remove the seed's own effect; the test is a paired t-test
on them. Imports nothing from fedsim (lowest layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedDiff:
    """Summary of the differences ``a_i - b_i``. ``std`` has ddof=1; the CI is for the mean difference."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float = 0.95


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Paired t statistics of ``a_i - b_i``, pairs matched by index.

    n = 1: std, CI and p-value are nan (no spread to estimate). Differences all equal (n >= 2, up
    to float rounding): std 0, CI (mean, mean), p-value 0 when the mean is nonzero, else 1.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if not len(a):
        raise ValueError("paired_difference needs at least one pair")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n, mean = len(d), float(d.mean())
    if n == 1:
        nan = float("nan")
        return PairedDiff(1, mean, nan, nan, nan, nan, confidence)
    std = float(d.std(ddof=1))
    # 0.1 - 0.05 != 0.2 - 0.15 in floats: spread at rounding level is no spread
    if std <= 1e-12 * max(1.0, abs(mean)):
        return PairedDiff(n, mean, 0.0, mean, mean, 0.0 if mean != 0 else 1.0, confidence)
    sem = std / math.sqrt(n)
    half = float(stats.t.ppf((1 + confidence) / 2, df=n - 1)) * sem
    p_value = float(2 * stats.t.sf(abs(mean) / sem, df=n - 1))
    return PairedDiff(n, mean, std, mean - half, mean + half, p_value, confidence)


def format_diff(d: PairedDiff, digits: int = 3) -> str:
    """``+0.031 [+0.012, +0.050]``: mean difference and its CI; ``+0.031 [n/a]`` without a CI (n = 1)."""
    if math.isnan(d.ci_low) or math.isnan(d.ci_high):
        return f"{d.mean:+.{digits}f} [n/a]"
    return f"{d.mean:+.{digits}f} [{d.ci_low:+.{digits}f}, {d.ci_high:+.{digits}f}]"
