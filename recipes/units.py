"""Times in a recipe's own units: batches, samples and tokens converted with the run's geometry.

Recipes mix units the way papers do: Mambaoutai warms up for 2000 steps and decays over 30B
tokens of a 300B-token run. Composer's schedules compare times of one unit, so before the
scheduler is built every time argument (``t_warmup``, ``t_decay``, ``t_start``, ``t_max``) in
batches, samples or tokens is rewritten in ``max_duration``'s unit, with the run's batch size
and sequence length:

    samples(n batches) = n * global batch       (with a batch ramp: the sum of the ramp's first n batches)
    tokens(s samples)  = s * seq_len            (Composer counts input_ids.numel())

and the inverse rounds up to the first boundary at or after the time (a batch boundary for
batches, a whole sample for samples). Fractions (``0.2``, ``'0.2dur'``) and epochs are left to
Composer, which resolves them against ``max_duration``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

from composer.core import Time, TimeUnit

from callbacks.batch_rampup import BatchRampSchedule

CONVERTIBLE = (TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)


@dataclass(frozen=True)
class Geometry:
    """How batches, samples and tokens relate in a run."""

    seq_len: int
    global_batch: int  # samples per optimizer step (the target, with a ramp)
    ramp: BatchRampSchedule | None = None

    def _ramp(self) -> tuple[list[int], int]:
        """Samples trained before each step of the ramp (cumulative), and the batch after it."""
        assert self.ramp is not None
        cumulative, tokens = [0], 0
        while tokens < self.ramp.ramp_tokens:
            size = self.ramp.global_batch_size(tokens)
            cumulative.append(cumulative[-1] + size)
            tokens += size * self.seq_len
        return cumulative, self.ramp.global_batch_size(tokens)

    def samples_before(self, batches: int) -> int:
        """Samples trained by the first ``batches`` optimizer steps."""
        if self.ramp is None:
            return batches * self.global_batch
        cumulative, after = self._ramp()
        if batches < len(cumulative):
            return cumulative[batches]
        return cumulative[-1] + (batches - len(cumulative) + 1) * after

    def batches_until(self, samples: int) -> int:
        """The first step boundary at or after ``samples`` samples."""
        if self.ramp is None:
            return -(-samples // self.global_batch)
        cumulative, after = self._ramp()
        if samples <= cumulative[-1]:
            return bisect.bisect_left(cumulative, samples)
        return len(cumulative) - 1 + -(-(samples - cumulative[-1]) // after)

    def convert(self, time: Time, unit: TimeUnit) -> Time:
        """``time`` (batches, samples or tokens) in ``unit``."""
        if time.unit == unit:
            return time
        value = int(time.value)
        samples = {
            TimeUnit.BATCH: lambda: self.samples_before(value),
            TimeUnit.SAMPLE: lambda: value,
            TimeUnit.TOKEN: lambda: -(-value // self.seq_len),
        }[time.unit]()
        out: dict[TimeUnit, Callable[[], int]] = {
            TimeUnit.BATCH: lambda: self.batches_until(samples),
            TimeUnit.SAMPLE: lambda: samples,
            TimeUnit.TOKEN: lambda: samples * self.seq_len,
        }
        return Time(out[unit](), unit)


_TIME = re.compile(r"\s*[0-9]*\.?[0-9]+(e[+-]?[0-9]+)?\s*(ba|tok|sp|ep|dur)\s*", re.IGNORECASE)
UNITS = "ba (batches), tok (tokens), sp (samples) or ep (epochs)"


def time_problem(key: str, value: object, example: str, fraction: bool) -> str | None:
    """Why ``value`` (of config ``key``) is not a Composer time string with a unit, or None.

    ``fraction``: a fraction of the run (``0.2``, ``0.2dur``) is accepted too.
    """
    if fraction and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    text = str(value)
    match = _TIME.fullmatch(text)
    if match and (fraction or match.group(2).lower() != "dur"):
        return None
    forms = UNITS + (", or a fraction of the run (0.2dur)" if fraction else "")
    return (
        f"{key}={text!r} is not a time with a unit (Composer would read a bare number as seconds): write a "
        f"number and one of {forms}, e.g. {key}={example}"
    )


def _as_time(value: object) -> Time | None:
    if not isinstance(value, str):
        return None
    try:
        return Time.from_timestring(value)
    except ValueError:
        return None  # not a time string: the scheduler's own check names it


# Schedules whose warmup may keep its own unit: the warmup ramp is measured in it, the decay in
# max_duration's (callbacks/schedulers.py, PhasedScheduler). Elsewhere the decay starts where the
# warmup ends, so both must share one unit.
OWN_UNIT_WARMUP = ("wsd",)


def convert_schedule_times(
    name: str, args: dict[str, object], max_duration: str, geometry: Geometry
) -> tuple[dict[str, object], list[str], list[str]]:
    """``args`` of schedule ``name`` with its times in batches/samples/tokens in ``max_duration``'s unit.

    Returns the new arguments, one line per conversion (for the start-up log), and the problems:
    with a batch ramp, a warmup in batches or samples of a schedule whose decay starts where the
    warmup ends is ambiguous (linear in steps, or in tokens?) and is refused, naming the tokens it
    would end at.
    """
    target = Time.from_timestring(max_duration).unit
    out, notes, problems = dict(args), [], []
    if target not in CONVERTIBLE:
        return out, notes, problems
    for key, value in args.items():
        time = _as_time(value)
        if not key.startswith("t_") or time is None or time.unit not in CONVERTIBLE or time.unit == target:
            continue
        if key == "t_warmup" and name in OWN_UNIT_WARMUP:
            continue
        converted = geometry.convert(time, target)
        if key == "t_warmup" and geometry.ramp is not None and time.unit != TimeUnit.TOKEN:
            tokens = geometry.convert(time, TimeUnit.TOKEN)
            problems.append(
                f"scheduler.t_warmup={value} is ambiguous with batch_rampup: the {name} schedule decays from "
                f"where its warmup ends, in {target.value}, while the batch grows; write the warmup in "
                f"tokens (with this ramp and {geometry.ramp.world_size} processes, {value} ends at "
                f"{tokens.value}tok)"
            )
            continue
        out[key] = f"{converted.value}{target.value}"
        notes.append(f"scheduler.{key}={value} -> {out[key]}")
    return out, notes, problems
