"""Schedule times converted between batches, samples and tokens with the run's geometry."""

from __future__ import annotations

import bisect

import pytest
from composer.core import Time, TimeUnit

from callbacks.batch_rampup import BatchRampSchedule
from recipes.units import Geometry, convert_schedule_times

TOK, BA, SP = TimeUnit.TOKEN, TimeUnit.BATCH, TimeUnit.SAMPLE


def test_constant_batch_converts_exactly_and_rounds_up_to_a_boundary() -> None:
    g = Geometry(seq_len=4096, global_batch=512)
    assert g.convert(Time(480, BA), TOK) == Time(480 * 512 * 4096, TOK)  # the paper's warmup, in tokens
    assert g.convert(Time(480 * 512 * 4096, TOK), BA) == Time(480, BA)
    assert g.convert(Time(480 * 512 * 4096 + 1, TOK), BA) == Time(481, BA)  # the next boundary
    assert g.convert(Time(1000, SP), TOK) == Time(1000 * 4096, TOK)
    assert g.convert(Time(4097, TOK), SP) == Time(2, SP)


def test_ramp_conversion_equals_a_step_by_step_count() -> None:
    ramp = BatchRampSchedule(262144, 512 * 4096, 1_000_000_000, 4096, 4, 8)
    g = Geometry(4096, 512, ramp)
    cumulative, tokens = [0], 0
    for _ in range(4000):  # past the end of the ramp
        size = ramp.global_batch_size(tokens)
        cumulative.append(cumulative[-1] + size)
        tokens += size * 4096
    for n in (0, 1, 2, 479, 480, 1264, 1265, 1266, 3999):
        assert g.convert(Time(n, BA), SP) == Time(cumulative[n], SP), n
    for samples in (0, 1, 63, 64, 65, cumulative[1265], cumulative[1265] + 1, cumulative[3000] - 7):
        assert g.convert(Time(samples, SP), BA) == Time(bisect.bisect_left(cumulative, samples), BA), samples


def test_schedule_times_meet_max_durations_unit() -> None:
    g = Geometry(seq_len=100, global_batch=10)
    # WSD's warmup keeps its unit (the warmup ramps in steps, the decay in tokens); t_decay is converted.
    args, notes, problems = convert_schedule_times(
        "wsd", {"t_warmup": "5ba", "t_decay": "20ba", "alpha_f": 0.1}, "100000tok", g
    )
    assert args == {"t_warmup": "5ba", "t_decay": "20000tok", "alpha_f": 0.1}
    assert notes == ["scheduler.t_decay=20ba -> 20000tok"] and problems == []
    # Cosine decays from where the warmup ends: one unit for both.
    args, _, problems = convert_schedule_times("cosine", {"t_warmup": "5ba"}, "100000tok", g)
    assert args == {"t_warmup": "5000tok"} and problems == []
    args, _, _ = convert_schedule_times("decay_phase", {"t_start": "0ba", "t_max": "1dur"}, "100000tok", g)
    assert args == {"t_start": "0tok", "t_max": "1dur"}  # fractions stay Composer's
    # Epochs: Composer resolves them against the loader; nothing to convert.
    assert convert_schedule_times("cosine", {"t_warmup": "5ba"}, "2ep", g)[0] == {"t_warmup": "5ba"}


def test_a_warmup_in_steps_with_a_batch_ramp_is_refused_for_a_schedule_without_stable_phase() -> None:
    ramp = BatchRampSchedule(262144, 512 * 4096, 1_000_000_000, 4096, 4, 64)
    g = Geometry(4096, 512, ramp)
    _, _, problems = convert_schedule_times("cosine", {"t_warmup": "480ba"}, "1e10tok", g)
    assert len(problems) == 1
    assert "scheduler.t_warmup=480ba is ambiguous with batch_rampup" in problems[0]
    assert "with this ramp and 64 processes, 480ba ends at 503316480tok" in problems[0]
    assert convert_schedule_times("wsd", {"t_warmup": "480ba"}, "1e10tok", g)[2] == []


@pytest.mark.parametrize("value", ["0.2", "1dur", 0.2])
def test_non_times_are_left_alone(value: object) -> None:
    args, notes, _ = convert_schedule_times("wsd", {"t_decay": value}, "100ba", Geometry(10, 2))
    assert args == {"t_decay": value} and notes == []
