"""Per-phase data mixtures: which converted streams a training phase reads, and how much of each.

A mixture YAML (``yamls/data/*.yaml``) lists phases, each a set of named streams::

    root: /data/mds
    phases:
      stable:
        streams:
          en:   {local: ${root}/en,   proportion: 0.6}
          code: {local: ${root}/code, proportion: 0.4}
      decay:
        streams:
          en:   {local: ${root}/en,   repeat: 0.05}
          chat: {local: ${root}/chat, repeat: 1.0}   # one epoch of instruction data

Weights map onto ``streaming.Stream``: either every stream of a phase has a ``proportion``
(relative: shares of the epoch) or none does (absolute: ``repeat`` = epochs of that stream per
epoch, ``choose`` = samples per epoch, neither = one epoch). Streaming refuses a mix of the two.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError, load_config


@dataclass
class StreamConfig:
    """One converted stream (a ``data.convert`` output folder holding ``train/`` and ``val/``)."""

    local: str = ""  # the converted folder; with ``remote``, the local cache for it
    remote: str | None = None  # e.g. s3://bucket/mds/en (Streaming downloads and caches shards)
    proportion: float | None = None  # relative weight (all streams of a phase, or none)
    repeat: float | None = None  # absolute: epochs of this stream per epoch (0.5 = half of it)
    choose: int | None = None  # absolute: samples of this stream per epoch


@dataclass
class PhaseConfig:
    """The streams one training phase reads."""

    streams: dict[str, StreamConfig] = field(default_factory=dict)


@dataclass
class MixtureConfig:
    """A mixture file: a ``root`` for interpolation (``${root}/en``) and its phases."""

    root: str = ""
    phases: dict[str, PhaseConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("mixture has no phases: add phases.<name>.streams")
        for phase_name, phase in self.phases.items():
            key = f"phases.{phase_name}.streams"
            if not phase.streams:
                raise ValueError(f"{key} is empty: name at least one stream with its local folder")
            relative = [name for name, s in phase.streams.items() if s.proportion is not None]
            if relative and len(relative) != len(phase.streams):
                absolute = sorted(set(phase.streams) - set(relative))
                raise ValueError(
                    f"{key}: streams {relative} have a proportion but {absolute} do not; give every stream "
                    "a proportion (relative mix) or none (absolute mix with repeat/choose)"
                )
            for name, stream in phase.streams.items():
                _check_stream(f"{key}.{name}", stream)


def _check_stream(key: str, stream: StreamConfig) -> None:
    if not stream.local and not stream.remote:
        raise ValueError(
            f"{key}.local is empty: set it to the folder written by `python -m data.convert --out`"
        )
    weights = [w for w in ("proportion", "repeat", "choose") if getattr(stream, w) is not None]
    if len(weights) > 1:
        raise ValueError(f"{key} sets {' and '.join(weights)}: keep only one of proportion, repeat, choose")
    if stream.proportion is not None and not stream.proportion > 0:
        raise ValueError(
            f"{key}.proportion={stream.proportion} must be > 0 (drop the stream to leave it out)"
        )
    if stream.repeat is not None and not stream.repeat > 0:
        raise ValueError(f"{key}.repeat={stream.repeat} must be > 0 (drop the stream to leave it out)")
    if stream.choose is not None and not stream.choose > 0:
        raise ValueError(f"{key}.choose={stream.choose} must be > 0 (drop the stream to leave it out)")


def load_mixture(path: str | Path, overrides: Sequence[str] = ()) -> MixtureConfig:
    """Load and check a mixture YAML (``overrides`` as ``key=value``, e.g. ``root=/data``)."""
    try:
        return load_config(MixtureConfig, [path], overrides)
    except ConfigError as exc:
        # common.config suggests keys of dataclass sections only; streams sit inside dicts.
        unknown = re.match(r"unknown config key '([^']+)'", str(exc))
        if unknown is None or "did you mean" in str(exc):
            raise
        leaf = unknown.group(1).rsplit(".", 1)[-1]
        valid = [
            f.name for cls in (StreamConfig, PhaseConfig, MixtureConfig) for f in dataclasses.fields(cls)
        ]
        close = difflib.get_close_matches(leaf, valid, n=1)
        if not close:
            raise
        raise ConfigError(f"{str(exc).rstrip('.')} (did you mean '{close[0]}'?)") from exc


def phase_streams(mixture: MixtureConfig, phase: str, source: str = "") -> dict[str, StreamConfig]:
    """The streams of ``phase``; an unknown phase fails listing the valid ones."""
    if phase not in mixture.phases:
        raise ConfigError(
            f"phase {phase!r} is not in the mixture {source}; phases: {', '.join(mixture.phases)} (set data.phase)"
        )
    return mixture.phases[phase].streams
