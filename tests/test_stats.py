import math

import pytest
from scipy import stats

from fedsim.stats import PairedDiff, format_diff, paired_difference

A = [0.50, 0.52, 0.47, 0.55, 0.51]
B = [0.48, 0.49, 0.46, 0.50, 0.47]


def test_against_hand_computation():
    # differences 0.02, 0.03, 0.01, 0.05, 0.04: mean 0.03, squared deviations sum to 0.001
    mean = 0.03
    sd = math.sqrt(0.001 / 4)
    t975 = 2.7764451051977987  # Student t quantile, 4 degrees of freedom
    half = t975 * sd / math.sqrt(5)
    d = paired_difference(A, B)
    assert d.n == 5
    assert d.mean == pytest.approx(mean, abs=1e-12)
    assert d.std == pytest.approx(sd, abs=1e-12)
    assert (d.ci_low, d.ci_high) == pytest.approx((mean - half, mean + half), abs=1e-12)
    t = mean / (sd / math.sqrt(5))  # = 4.2426...
    assert d.p_value == pytest.approx(2 * stats.t.sf(t, 4), rel=1e-9)
    assert d.p_value == pytest.approx(stats.ttest_rel(A, B).pvalue, rel=1e-9)
    assert 0.01 < d.p_value < 0.02
    assert format_diff(d) == "+0.030 [+0.010, +0.050]"
    swapped = paired_difference(B, A)
    assert format_diff(swapped) == "-0.030 [-0.050, -0.010]" and swapped.p_value == pytest.approx(d.p_value)


def test_wider_confidence_wider_interval():
    narrow, wide = paired_difference(A, B, 0.9), paired_difference(A, B, 0.99)
    assert wide.ci_low < narrow.ci_low < narrow.ci_high < wide.ci_high


def test_single_pair_has_no_interval():
    d = paired_difference([0.6], [0.5])
    assert d.n == 1 and d.mean == pytest.approx(0.1)
    assert all(math.isnan(v) for v in (d.std, d.ci_low, d.ci_high, d.p_value))
    assert format_diff(d) == "+0.100 [n/a]"


def test_zero_variance():
    d = paired_difference([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # 0.1 each, up to float rounding
    assert d == PairedDiff(3, d.mean, 0.0, d.mean, d.mean, 0.0)
    assert d.mean == pytest.approx(0.1)
    same = paired_difference([0.4, 0.5], [0.4, 0.5])
    assert (same.mean, same.std, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])
