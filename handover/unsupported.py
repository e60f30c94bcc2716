"""A checkpoint setting this repository cannot represent is refused, naming it: every format's
config reader (handover/hf_mamba.py, handover/bamba.py, handover/mamba_ssm.py) checks through these."""

from __future__ import annotations

from typing import Any


class UnsupportedCheckpoint(ValueError):
    """A checkpoint setting this repository cannot represent: loading it would change its numbers."""


def merge_defaults(
    given: dict[str, Any], defaults: dict[str, Any], where: str, source: str
) -> dict[str, Any]:
    """``given`` over mamba_ssm's ``defaults``, refusing a key mamba_ssm does not accept either."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UnsupportedCheckpoint(
            f"{source}: {where} has {unknown}, which mamba_ssm 2.3.1 does not accept either "
            f"(valid: {', '.join(sorted(defaults))}); fix the config.json"
        )
    return {**defaults, **given}


def integral_expand(expand: Any, where: str, source: str) -> int:
    """An integer ``expand`` (d_inner = expand * d_model), refused otherwise."""
    if float(expand) != int(expand):
        raise UnsupportedCheckpoint(
            f"{source}: {where}={expand}: this repository's model.ssm.expand is an integer "
            "(d_inner = expand * d_model)"
        )
    return int(expand)


def require(value: Any, supported: Any, setting: str, why: str, source: str) -> None:
    """Refuse ``setting`` unless its ``value`` is the ``supported`` one; ``why`` says what it would add."""
    if value != supported:
        raise UnsupportedCheckpoint(
            f"{source}: {setting}={value!r} is not supported ({why}); only {supported!r} loads with the "
            "checkpoint's own numbers, so it is refused"
        )
