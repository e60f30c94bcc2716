"""Learning-rate schedules: warmup-stable-decay (WSD), its decay-only phase, and cosine.

Each class is a Composer ``ComposerScheduler``: a pure function ``(state, ssr) -> multiplier`` of
the optimizer's peak learning rate, so a run can be resumed, or re-planned, from any checkpoint.
Its constructor is its config (``scheduler: {name: wsd, ...}`` in a recipe; the names are in
``callbacks/registry.py``, beside Composer's own ``linear_with_warmup``, which is D2Z with
``alpha_f: 0``, and ``constant_with_warmup``).

All schedules here are one piecewise function of the training time ``t`` (Composer's timestamp,
in batches ``ba``, tokens ``tok``, samples ``sp``; epochs ``ep`` are turned into batches and
``dur`` fractions into ``max_duration``'s unit, as Composer's own schedulers do)::

    t < T_w                    : t / T_w                      linear warmup from 0 (T_w may be 0)
    T_w <= t < T_s             : 1                            stable
    T_s <= t                   : decay(x), x = min(1, (t - T_s) / (T_e - T_s))

with ``decay(0) = 1`` (no jump when the decay starts) and ``decay(1) = alpha_f``:

    linear       1 - (1 - alpha_f) x
    cosine       alpha_f + (1 - alpha_f) (1 + cos(pi x)) / 2
    1-sqrt       alpha_f + (1 - alpha_f) (1 - sqrt(x))        (Hägele et al. 2024)
    exponential  alpha_f ** x                                 (needs alpha_f > 0)

* WSD (Hu et al. 2024, MiniCPM; the Mambaoutai recipe): ``T_s = T_e - t_decay``, ``T_e = t_max``.
  The decay ends exactly at ``alpha_f`` (the common definition: ModernBERT, torchtitan,
  Megatron, OLMo-core). LightOn's own code instead clamps ``max(alpha_f, linear-to-zero)``,
  which reaches ``alpha_f`` before the end and stays there.
* Cosine (the paper's baseline, "10x decay" = ``alpha_f: 0.1``): no stable phase, ``T_s = T_w``.
  Equal to Composer's ``CosineAnnealingWithWarmupScheduler`` at ``ssr = 1`` (tested). It is not
  reused because with ``scale_warmup=True`` and ``ssr != 1`` Composer stretches the warmup ramp
  but still ends it at the unscaled ``t_warmup`` (the lr then jumps), and it warns on every
  call when ``t_warmup`` is 0.
* Decay phase: no warmup, stable until ``t_start`` (the step of a pre-decay checkpoint), then
  decay until ``t_max``; its value at ``t_start`` is 1, the stable lr.

Composer evaluates a scheduler after each optimizer step and *before* it advances the
timestamp, so batch ``n >= 1`` trains with ``f(n - 1)`` and batch 0 with ``f(0)``; with a
warmup the first two batches therefore run at lr 0 (AdamW still updates its moments).

The scale schedule ratio ``ssr`` multiplies every time except, by default, the warmup
(``scale_warmup=False``, Composer's convention); ``dur`` times are fractions of ``max_duration``,
which the Trainer has already multiplied by ``ssr``.
"""

from __future__ import annotations

import math
import typing
from typing import Literal, NamedTuple

from composer.core import State, Time, TimeUnit

# Composer's own time conversion (private, stable in the pinned 0.32.1), so that 'ep', 'dur' and the
# scale schedule ratio mean here exactly what they mean in Composer's schedulers.
from composer.optim.scheduler import ComposerScheduler, _convert_time

DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
DECAY_SHAPES: tuple[str, ...] = typing.get_args(DecayShape)

_ALLOWED_UNITS = (TimeUnit.BATCH, TimeUnit.TOKEN, TimeUnit.SAMPLE, TimeUnit.EPOCH, TimeUnit.DURATION)


def decay_value(x: float, decay_shape: str, alpha_f: float) -> float:
    """The decay multiplier at decay progress ``x`` in [0, 1]: 1 at ``x = 0``, ``alpha_f`` at ``x = 1``."""
    if decay_shape == "linear":
        return 1.0 - (1.0 - alpha_f) * x
    if decay_shape == "cosine":
        return alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + math.cos(math.pi * x))
    if decay_shape == "1-sqrt":
        return alpha_f + (1.0 - alpha_f) * (1.0 - math.sqrt(x))
    if decay_shape == "exponential":
        return alpha_f**x
    raise ValueError(f"unknown decay_shape {decay_shape!r}; valid shapes: {', '.join(DECAY_SHAPES)}")


def _parse_time(value: str | Time, key: str, owner: str) -> Time:
    """A time string or ``Time`` as a ``Time``, rejecting wall-clock and iteration units."""
    if isinstance(value, str):
        try:
            value = Time.from_timestring(value)
        except ValueError as err:
            raise ValueError(
                f"{owner}: {key}={value!r} is not a Composer time string; write e.g. '1000ba', "
                "'3e7tok', '500sp', '1ep' or '0.2dur'"
            ) from err
    if not isinstance(value, Time):
        raise ValueError(
            f"{owner}: {key}={value!r} must be a Composer time string such as '1000ba' or '0.2dur'"
        )
    if value.unit not in _ALLOWED_UNITS:
        raise ValueError(
            f"{owner}: {key}={value} uses the unit {value.unit.value!r}; use one of "
            f"{', '.join(u.value for u in _ALLOWED_UNITS)}"
        )
    if value.value < 0:
        raise ValueError(f"{owner}: {key}={value} is negative; it must be >= 0")
    return value


def _check_decay(decay_shape: str, alpha_f: float, owner: str) -> None:
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(
            f"{owner}: unknown decay_shape {decay_shape!r}; set decay_shape to one of: {', '.join(DECAY_SHAPES)}"
        )
    if not 0.0 <= alpha_f <= 1.0:
        raise ValueError(
            f"{owner}: alpha_f={alpha_f} is outside [0, 1]; it is the final lr as a fraction of the peak "
            "(e.g. 0.1 for a 10x decay, 0 to decay to zero)"
        )
    if decay_shape == "exponential" and alpha_f <= 0.0:
        raise ValueError(
            f"{owner}: decay_shape='exponential' computes alpha_f ** x and needs alpha_f > 0 (got {alpha_f}); "
            "set alpha_f to e.g. 0.01, or pick decay_shape 'linear' to decay to zero"
        )


class Phases(NamedTuple):
    """Phase boundaries resolved against a state: warmup ends, decay starts, decay ends.

    ``decay_start`` and ``decay_end`` share a unit; ``warmup_end`` may use another one (warmup in
    batches, decay in tokens, as in Mambaoutai's 2000-step warmup and 30B-token decay).
    """

    warmup_end: Time
    decay_start: Time
    decay_end: Time


class PhasedScheduler(ComposerScheduler):
    """Base of every schedule here: warmup -> stable -> decay; subclasses resolve the ``Phases``."""

    decay_shape: str
    alpha_f: float

    def phases(self, state: State, ssr: float = 1.0) -> Phases:
        raise NotImplementedError

    def stable_end(self, state: State, ssr: float = 1.0) -> Time:
        """When the stable phase ends and the decay begins (in ``max_duration``'s unit).

        A checkpoint saved when ``state.timestamp`` reaches this time holds the pre-decay weights:
        every batch before it trained at the peak lr (or in warmup), and a decay phase started
        from it (``DecayPhaseScheduler(t_start=<this time>)``) continues at lr multiplier 1.
        """
        return self.phases(state, ssr).decay_start

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        warmup_end, decay_start, decay_end = self.phases(state, ssr)
        t_warm = state.timestamp.get(warmup_end.unit).value
        t = state.timestamp.get(decay_start.unit).value
        if t_warm < warmup_end.value:
            if t >= decay_start.value:
                raise ValueError(
                    f"{type(self).__name__}: the decay started at {decay_start} while the warmup "
                    f"(until {warmup_end}) is still running; shorten t_warmup or t_decay"
                )
            return t_warm / warmup_end.value
        if t < decay_start.value:
            return 1.0
        x = min(1.0, (t - decay_start.value) / (decay_end.value - decay_start.value))
        return decay_value(x, self.decay_shape, self.alpha_f)


class WarmupStableDecayScheduler(PhasedScheduler):
    """Linear warmup to the peak, constant peak, then a decay to ``alpha_f`` over the last ``t_decay``.

    Args:
        t_warmup: Warmup length, a time string ('480ba', '1e9tok', '0.01dur') or ``Time``; may be 0.
        t_decay: Decay length. A float in (0, 1] is a fraction of ``t_max`` (0.2 = the last 20%);
            otherwise a time string or ``Time``. ``None``: no stable phase, the decay starts when
            the warmup ends (cosine).
        decay_shape: 'linear' | 'cosine' | '1-sqrt' | 'exponential'.
        alpha_f: Final multiplier of the peak lr, in [0, 1] (> 0 for 'exponential').
        t_max: End of the schedule, default '1dur' = the Trainer's ``max_duration``. Past it the
            multiplier stays at ``alpha_f``.
        scale_warmup: Whether the scale schedule ratio also stretches the warmup.
    """

    def __init__(
        self,
        t_warmup: str | Time = "0ba",
        t_decay: str | Time | float | None = 0.2,
        decay_shape: DecayShape = "linear",
        alpha_f: float = 0.0,
        t_max: str | Time = "1dur",
        scale_warmup: bool = False,
    ) -> None:
        owner = type(self).__name__
        _check_decay(decay_shape, alpha_f, owner)
        self.t_warmup = _parse_time(t_warmup, "t_warmup", owner)
        if isinstance(t_decay, (int, float)) and not isinstance(t_decay, bool):
            if not 0.0 < t_decay <= 1.0:
                raise ValueError(
                    f"{owner}: t_decay={t_decay} as a number is a fraction of t_max and must be in (0, 1]; "
                    "write an absolute length as a time string such as '2000ba' or '3e10tok'"
                )
            self.t_decay: Time | None = Time(float(t_decay), TimeUnit.DURATION)
        else:
            self.t_decay = None if t_decay is None else _parse_time(t_decay, "t_decay", owner)
            if self.t_decay is not None and self.t_decay.value == 0:
                raise ValueError(
                    f"{owner}: t_decay={self.t_decay} is empty; give the decay a positive length"
                )
        self.decay_shape = decay_shape
        self.alpha_f = float(alpha_f)
        self.t_max = _parse_time(t_max, "t_max", owner)
        self.scale_warmup = scale_warmup

    def phases(self, state: State, ssr: float = 1.0) -> Phases:
        owner = type(self).__name__
        warmup_end = _convert_time(self.t_warmup, state, ssr=ssr if self.scale_warmup else 1.0)
        decay_end = _convert_time(self.t_max, state, ssr=ssr)
        if self.t_decay is None:
            if warmup_end.unit != decay_end.unit and warmup_end.value > 0:
                raise ValueError(
                    f"{owner}: with no stable phase the decay starts when the warmup ends, so t_warmup "
                    f"({warmup_end}) and t_max ({decay_end}) must use one unit; write t_warmup in "
                    f"{decay_end.unit.value!r} or as a fraction of training ('0.01dur')"
                )
            decay_start = Time(warmup_end.value if warmup_end.unit == decay_end.unit else 0, decay_end.unit)
        else:
            decay_len = _convert_time(self.t_decay, state, ssr=ssr)
            if decay_len.unit != decay_end.unit:
                raise ValueError(
                    f"{owner}: t_decay ({decay_len}) and t_max ({decay_end}, from max_duration by default) "
                    f"use different units; write t_decay in {decay_end.unit.value!r} or as a fraction (0.2)"
                )
            if decay_len.value == 0:
                raise ValueError(
                    f"{owner}: t_decay ({self.t_decay}) resolves to 0 ({decay_end.unit.value}) for t_max "
                    f"{decay_end}; give the decay a positive length"
                )
            decay_start = Time(decay_end.value - decay_len.value, decay_end.unit)
            if decay_start.value < 0 or (warmup_end.unit == decay_end.unit and decay_start < warmup_end):
                raise ValueError(
                    f"{owner}: t_warmup ({warmup_end}) + t_decay ({decay_len}) exceed t_max ({decay_end}); "
                    "shorten t_warmup or t_decay, or train longer (max_duration)"
                )
        if decay_start >= decay_end:
            raise ValueError(
                f"{owner}: the warmup ({warmup_end}) fills the whole schedule (t_max {decay_end}); "
                "shorten t_warmup or train longer (max_duration)"
            )
        return Phases(warmup_end, decay_start, decay_end)


class CosineWithWarmupScheduler(WarmupStableDecayScheduler):
    """Linear warmup, then cosine decay to ``alpha_f`` until ``t_max`` (the paper's baseline).

    "Passing the Torch": 480 warmup steps, cosine from 2e-3 to 2e-4, i.e. ``alpha_f: 0.1``.
    """

    def __init__(
        self,
        t_warmup: str | Time = "0ba",
        alpha_f: float = 0.0,
        t_max: str | Time = "1dur",
        scale_warmup: bool = False,
    ) -> None:
        super().__init__(t_warmup, None, "cosine", alpha_f, t_max, scale_warmup)


class DecayPhaseScheduler(PhasedScheduler):
    """The decay phase of a WSD run, started from a pre-decay (stable-phase) checkpoint.

    Multiplier 1 (the stable lr) until ``t_start``, then ``decay_shape`` down to ``alpha_f`` at
    ``t_max``. Resuming a full checkpoint saved at step S with ``max_duration = S + D`` and
    ``t_start = S`` (e.g. '8000ba') decays over the D new steps without a jump in the lr; after
    loading weights only (the timestamp restarts at 0) keep ``t_start = '0ba'``.

    Args:
        t_start: When the decay starts (time string or ``Time``; a checkpoint's timestamp).
        decay_shape: 'linear' | 'cosine' | '1-sqrt' | 'exponential'.
        alpha_f: Final multiplier of the peak lr, in [0, 1] (> 0 for 'exponential').
        t_max: When the decay ends, default '1dur' = the Trainer's ``max_duration``.
    """

    def __init__(
        self,
        t_start: str | Time = "0ba",
        decay_shape: DecayShape = "linear",
        alpha_f: float = 0.0,
        t_max: str | Time = "1dur",
    ) -> None:
        owner = type(self).__name__
        _check_decay(decay_shape, alpha_f, owner)
        self.t_start = _parse_time(t_start, "t_start", owner)
        self.decay_shape = decay_shape
        self.alpha_f = float(alpha_f)
        self.t_max = _parse_time(t_max, "t_max", owner)

    def phases(self, state: State, ssr: float = 1.0) -> Phases:
        owner = type(self).__name__
        decay_start = _convert_time(self.t_start, state, ssr=ssr)
        decay_end = _convert_time(self.t_max, state, ssr=ssr)
        if decay_start.unit != decay_end.unit:
            raise ValueError(
                f"{owner}: t_start ({decay_start}) and t_max ({decay_end}, from max_duration by default) use "
                f"different units; write t_start in {decay_end.unit.value!r}"
            )
        if decay_start >= decay_end:
            raise ValueError(
                f"{owner}: t_start ({decay_start}) is not before t_max ({decay_end}); set max_duration to "
                "t_start plus the length of the decay"
            )
        return Phases(Time(0, decay_start.unit), decay_start, decay_end)
