"""Paired comparisons across seeds: a Student t interval and a verdict that says what it can.

A comparison of two recipes is made seed by seed (same seed = same initialisation and data order),
so the unit of evidence is the paired difference ``d_i = variant_i - baseline_i``. With ``n`` seeds::

    mean  = sum(d_i) / n
    s     = sqrt(sum((d_i - mean)^2) / (n - 1))
    95% interval = mean ± t(0.975; n - 1) * s / sqrt(n)          (Student t, n - 1 degrees of freedom)

The verdict compares the interval with 0 and with a reference size (the effect the paper reports,
converted to the compared metric, or a stated smallest size of interest where the paper gives none):

- "effect": the interval excludes 0;
- "no effect at this scale (interval excludes the paper's size)": it holds 0 but excludes the
  reference size (the wording names the reference when it is not the paper's);
- "inconclusive (interval too wide)": it holds both (or there is no reference to exclude).

The t quantile is computed here, without SciPy: the two-sided probability P(|T| <= t) for an
integer number of degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3-4), inverted by
bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with ``df`` (integer >= 1) degrees of freedom, t >= 0."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom {df} must be an integer >= 1")
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 terms in cos
        total, term = 0.0, 1.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= (2 * j) / (2 * j + 1) * c * c
        series = s * c * total if df > 1 else 0.0
        return 2.0 / math.pi * (theta + series)
    total, term = 0.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
    for j in range(1, df // 2 + 1):
        total += term
        term *= (2 * j - 1) / (2 * j) * c * c
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level``: the half-width multiplier of a two-sided ``level`` interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} must be in (0, 1)")
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < level:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A paired mean difference and its Student t interval."""

    n: int
    mean: float
    low: float
    high: float
    t: float  # the quantile used, t(0.5 + level / 2; n - 1)

    def excludes(self, value: float) -> bool:
        return value < self.low or value > self.high


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Mean of the paired differences and its two-sided ``level`` interval (None below 2 seeds)."""
    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    t = t_quantile(level, n - 1)
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, t)


@dataclass(frozen=True)
class Reference:
    """The size an effect would have if the claim held, in the compared metric, and its source."""

    size: float
    source: str  # which number, from where, converted how
    from_paper: bool = True


EFFECT = "effect"
NO_EFFECT = "no effect at this scale (interval excludes the paper's size)"
INCONCLUSIVE = "inconclusive (interval too wide)"


def verdict(interval: Interval | None, reference: Reference | None) -> str:
    """ "effect", "no effect at this scale (...)" or "inconclusive (...)" (see the module docstring)."""
    if interval is None:
        return "inconclusive (one seed: no interval)"
    if interval.excludes(0.0):
        return EFFECT
    if reference is not None and interval.excludes(reference.size):
        if reference.from_paper:
            return NO_EFFECT
        return (
            f"no effect at this scale (interval excludes {reference.size:+g}, the smallest size of interest)"
        )
    return INCONCLUSIVE
