"""eval/stats.py: Student t quantiles against SciPy and a printed table, and the verdict's three cases."""

from __future__ import annotations

import pytest
from scipy import stats as scipy_stats

from eval.stats import (
    EFFECT,
    INCONCLUSIVE,
    NO_EFFECT,
    Interval,
    Reference,
    paired_interval,
    t_quantile,
    t_two_sided,
    verdict,
)


@pytest.mark.parametrize("df", [*range(1, 31), 49, 100])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_t_quantile_equals_scipy(df: int, level: float) -> None:
    assert t_quantile(level, df) == pytest.approx(scipy_stats.t.ppf(0.5 + level / 2, df), rel=1e-9)


def test_t_quantile_equals_the_printed_table() -> None:
    # Two-sided 95% (upper 0.025) critical values, NIST/SEMATECH e-Handbook of Statistical Methods,
    # table 1.3.6.7.2 (three decimals).
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 19: 2.093, 30: 2.042}
    for df, value in table.items():
        assert round(t_quantile(0.95, df), 3) == value, df
    assert t_two_sided(0.0, 3) == 0.0 and t_two_sided(1e9, 4) == pytest.approx(1.0)


def test_paired_interval_by_hand() -> None:
    # d = 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.29099, s / sqrt(4) = 0.645497, t(0.975; 3) = 3.182446.
    interval = paired_interval([1.0, 2.0, 3.0, 4.0])
    assert interval is not None and interval.n == 4 and interval.mean == 2.5
    assert interval.low == pytest.approx(2.5 - 3.182446 * 0.645497, abs=1e-5)
    assert interval.high == pytest.approx(2.5 + 3.182446 * 0.645497, abs=1e-5)
    assert paired_interval([0.3]) is None


def test_the_three_verdicts() -> None:
    paper = Reference(-0.0188, "paper")
    assert verdict(Interval(3, -0.05, -0.08, -0.02, 4.3), paper) == EFFECT  # excludes 0
    assert verdict(Interval(3, 0.0, -0.005, 0.005, 4.3), paper) == NO_EFFECT  # holds 0, excludes -0.0188
    assert verdict(Interval(3, -0.01, -0.03, 0.01, 4.3), paper) == INCONCLUSIVE  # holds both
    assert verdict(Interval(3, 0.0, -0.005, 0.005, 4.3), None) == INCONCLUSIVE  # nothing to exclude
    ours = Reference(0.01, "ours", from_paper=False)
    assert verdict(Interval(3, 0.0, -0.005, 0.005, 4.3), ours) == (
        "no effect at this scale (interval excludes +0.01, the smallest size of interest)"
    )
    assert verdict(None, paper) == "inconclusive (one seed: no interval)"
    with pytest.raises(ValueError, match="degrees of freedom 0"):
        t_quantile(0.95, 0)
