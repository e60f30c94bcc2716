"""The schedules' defaults, boundaries, scale schedule ratio and every error line, by hand.

Complements tests/test_schedulers.py: each case here pins a value or a message that a mutation
run (make mutants) showed no other test would notice changing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from composer.core import State, Time, Timestamp, TimeUnit
from composer.devices import DeviceCPU

from callbacks.schedulers import (
    CosineWithWarmupScheduler,
    DecayPhaseScheduler,
    WarmupStableDecayScheduler,
    decay_value,
)


def state_at(max_duration: str, **timestamp: int) -> State:
    state = State(
        model=torch.nn.Linear(1, 1),
        rank_zero_seed=0,
        run_name="test",
        device=DeviceCPU(),
        max_duration=max_duration,
    )
    state.timestamp = Timestamp(**timestamp)
    return state


def test_wsd_defaults_no_warmup_last_fifth_linear_to_zero() -> None:
    """WarmupStableDecayScheduler(): no warmup, decay over the last 20% of max_duration, linearly to 0."""
    wsd = WarmupStableDecayScheduler()
    by_hand = {0: 1.0, 799: 1.0, 800: 1.0, 900: 0.5, 950: 0.25, 1000: 0.0}
    for batch, value in by_hand.items():
        assert wsd(state_at("1000ba", batch=batch)) == pytest.approx(value, abs=1e-12), batch


@pytest.mark.parametrize(
    "build", [lambda: WarmupStableDecayScheduler("100ba"), lambda: CosineWithWarmupScheduler("100ba")]
)
def test_by_default_the_scale_schedule_ratio_leaves_the_warmup_alone(build: Callable) -> None:
    """scale_warmup defaults to False: under ssr 2 the 100-batch warmup is still 100 batches."""
    sched = build()
    assert sched(state_at("2000ba", batch=50), ssr=2.0) == pytest.approx(0.5)
    assert sched(state_at("2000ba", batch=100), ssr=2.0) == 1.0


def test_stable_end_and_absolute_t_max_follow_the_scale_schedule_ratio() -> None:
    """max_duration arrives already scaled (2000ba for 1000ba at ssr 2); absolute times are scaled here."""
    wsd = WarmupStableDecayScheduler("100ba", "300ba")
    assert wsd.stable_end(state_at("2000ba"), ssr=2.0) == Time(1400, "ba")  # 2000 - 2 * 300
    # An absolute t_max (500ba -> 1000ba at ssr 2) with a 100ba decay (-> 200ba): linear from 800 to 1000.
    short = WarmupStableDecayScheduler("0ba", "100ba", t_max="500ba")
    assert short.stable_end(state_at("2000ba"), ssr=2.0) == Time(800, "ba")
    assert short(state_at("2000ba", batch=900), ssr=2.0) == pytest.approx(0.5)
    decay = DecayPhaseScheduler(t_start="100ba", t_max="200ba")  # -> 200ba .. 400ba at ssr 2
    assert decay(state_at("1000ba", batch=300), ssr=2.0) == pytest.approx(0.5)
    assert decay(state_at("1000ba", batch=400), ssr=2.0) == 0.0


def test_phases_without_a_ratio_are_the_unscaled_ones() -> None:
    assert tuple(WarmupStableDecayScheduler("10ba", "100ba").phases(state_at("1000ba"))) == (
        Time(10, "ba"),
        Time(900, "ba"),
        Time(1000, "ba"),
    )


def test_cosine_honours_alpha_f_and_t_max() -> None:
    cosine = CosineWithWarmupScheduler(alpha_f=0.2, t_max="500ba")
    assert cosine(state_at("1000ba", batch=250)) == pytest.approx(0.2 + 0.8 * 0.5)  # cos(pi / 2) = 0
    assert cosine(state_at("1000ba", batch=500)) == pytest.approx(0.2)
    assert cosine(state_at("1000ba", batch=900)) == pytest.approx(0.2)


def test_cosine_without_warmup_over_tokens_starts_its_decay_at_zero() -> None:
    """No warmup ('0ba') with max_duration in tokens is valid: the cosine runs over all tokens."""
    cosine = CosineWithWarmupScheduler()
    assert cosine(state_at("1000tok", token=0)) == 1.0
    assert cosine(state_at("1000tok", token=500)) == pytest.approx(0.5, abs=1e-12)
    assert cosine(state_at("1000tok", token=250)) == pytest.approx((1 + math.cos(math.pi / 4)) / 2, abs=1e-12)


def test_the_boundaries_of_t_decay() -> None:
    """t_decay 1.0 decays over the whole run (from batch 0); an absolute decay of one batch is valid."""
    whole = WarmupStableDecayScheduler("0ba", 1.0)
    assert whole.stable_end(state_at("1000ba")) == Time(0, "ba")
    assert whole(state_at("1000ba", batch=250)) == pytest.approx(0.75)
    one = WarmupStableDecayScheduler("0ba", "1ba")
    assert one(state_at("10ba", batch=9)) == 1.0
    assert one(state_at("10ba", batch=10)) == 0.0


def test_a_warmup_as_long_as_the_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="fills the whole schedule"):
        CosineWithWarmupScheduler("1000ba")(state_at("1000ba"))


def test_decay_value_refuses_an_unknown_shape() -> None:
    message = "unknown decay_shape 'cos'; valid shapes: linear, cosine, 1-sqrt, exponential"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        decay_value(0.5, "cos", 0.1)


ERRORS = [
    (
        lambda: WarmupStableDecayScheduler(t_warmup=5),  # type: ignore[arg-type]
        "WarmupStableDecayScheduler: t_warmup=5 must be a Composer time string such as '1000ba' or '0.2dur'",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_max="3sec"),
        "WarmupStableDecayScheduler: t_max=3sec uses the unit 'sec'; use one of ba, tok, sp, ep, dur",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_decay="0ba"),
        "WarmupStableDecayScheduler: t_decay=0ba is empty; give the decay a positive length",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_decay=0),
        "WarmupStableDecayScheduler: t_decay=0 as a number is a fraction of t_max and must be in (0, 1]; "
        "write an absolute length as a time string such as '2000ba' or '3e10tok'",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_decay="soon"),
        "WarmupStableDecayScheduler: t_decay='soon' is not a Composer time string; write e.g. '1000ba', "
        "'3e7tok', '500sp', '1ep' or '0.2dur'",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_max="soon"),
        "WarmupStableDecayScheduler: t_max='soon' is not a Composer time string; write e.g. '1000ba', "
        "'3e7tok', '500sp', '1ep' or '0.2dur'",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_warmup="-3ba"),
        "WarmupStableDecayScheduler: t_warmup=-3ba is negative; it must be >= 0",
    ),
    (
        lambda: WarmupStableDecayScheduler(decay_shape="cos"),  # type: ignore[arg-type]
        "WarmupStableDecayScheduler: unknown decay_shape 'cos'; set decay_shape to one of: linear, cosine, "
        "1-sqrt, exponential",
    ),
    (
        lambda: CosineWithWarmupScheduler(alpha_f=2.0),
        "CosineWithWarmupScheduler: alpha_f=2.0 is outside [0, 1]; it is the final lr as a fraction of the "
        "peak (e.g. 0.1 for a 10x decay, 0 to decay to zero)",
    ),
    (
        lambda: WarmupStableDecayScheduler(t_decay=0.001)(state_at("100ba")),
        "WarmupStableDecayScheduler: t_decay (0.001dur) resolves to 0 (ba) for t_max 100ba; give the decay a "
        "positive length",
    ),
    (
        lambda: WarmupStableDecayScheduler("300ba", 0.8)(state_at("1000ba")),
        "WarmupStableDecayScheduler: t_warmup (300ba) + t_decay (800ba) exceed t_max (1000ba); shorten "
        "t_warmup or t_decay, or train longer (max_duration)",
    ),
    (
        lambda: WarmupStableDecayScheduler("10ba", "100tok")(state_at("1000ba")),
        "WarmupStableDecayScheduler: t_decay (100tok) and t_max (1000ba, from max_duration by default) use "
        "different units; write t_decay in 'ba' or as a fraction (0.2)",
    ),
    (
        lambda: WarmupStableDecayScheduler("10ba", 0.1)(state_at("1000tok", batch=5, token=950)),
        "WarmupStableDecayScheduler: the decay started at 900tok while the warmup (until 10ba) is still "
        "running; shorten t_warmup or t_decay",
    ),
    (  # the decay starting on the very token the warmup is still running at
        lambda: WarmupStableDecayScheduler("10ba", 0.1)(state_at("1000tok", batch=5, token=900)),
        "WarmupStableDecayScheduler: the decay started at 900tok while the warmup (until 10ba) is still "
        "running; shorten t_warmup or t_decay",
    ),
    (
        lambda: CosineWithWarmupScheduler("1000ba")(state_at("1000ba")),
        "CosineWithWarmupScheduler: the warmup (1000ba) fills the whole schedule (t_max 1000ba); shorten "
        "t_warmup or train longer (max_duration)",
    ),
    (
        lambda: CosineWithWarmupScheduler("1ba")(state_at("1000tok")),
        "CosineWithWarmupScheduler: with no stable phase the decay starts when the warmup ends, so t_warmup "
        "(1ba) and t_max (1000tok) must use one unit; write t_warmup in 'tok' or as a fraction of training "
        "('0.01dur')",
    ),
    (
        lambda: DecayPhaseScheduler(t_start="10tok")(state_at("1000ba")),
        "DecayPhaseScheduler: t_start (10tok) and t_max (1000ba, from max_duration by default) use different "
        "units; write t_start in 'ba'",
    ),
    (
        lambda: DecayPhaseScheduler(t_start="1000ba")(state_at("1000ba")),
        "DecayPhaseScheduler: t_start (1000ba) is not before t_max (1000ba); set max_duration to t_start plus "
        "the length of the decay",
    ),
]


@pytest.mark.parametrize(("build", "message"), ERRORS)
def test_each_error_line_word_for_word(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build()


def test_a_time_object_in_seconds_is_refused_like_its_string() -> None:
    with pytest.raises(ValueError, match=r"^DecayPhaseScheduler: t_start=3sec uses the unit 'sec'"):
        DecayPhaseScheduler(t_start=Time(3, TimeUnit.SECOND))


def test_cosine_passes_scale_warmup_on() -> None:
    """scale_warmup=True: under ssr 2 the 100-batch warmup lasts 200 batches."""
    cosine = CosineWithWarmupScheduler("100ba", scale_warmup=True)
    assert cosine(state_at("2000ba", batch=100), ssr=2.0) == pytest.approx(0.5)
