"""Strict structured configs: dataclass schema + YAML files + CLI ``key=value`` overrides.

Every section of every config in this repository is a dataclass. ``load_config`` merges YAML
files and dotlist overrides onto the schema with omegaconf, then converts the result back to
dataclass objects, so ``__post_init__`` cross-field checks run on the final values.

User mistakes surface as ``ConfigError`` (a ``ValueError``) naming the offending key, the bad
value and the fix, e.g. ``unknown key 'optimzer' (did you mean 'optimizer'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from common.cli import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message names the key and the fix."""


def _valid_keys(schema: Any, dotted_parent: str) -> list[str]:
    """Field names available at ``dotted_parent`` (e.g. ``model.ssm``) of a dataclass schema."""
    node: Any = schema
    for part in [p for p in dotted_parent.split(".") if p]:
        if not dataclasses.is_dataclass(node):
            return []
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return []
        field = fields[part]
        node = field.type if isinstance(field.type, type) else _resolve_type(node, part)
    if not dataclasses.is_dataclass(node):
        return []
    return [f.name for f in dataclasses.fields(node)]


def _resolve_type(owner: Any, name: str) -> Any:
    import typing

    hints = typing.get_type_hints(owner if isinstance(owner, type) else type(owner))
    hint = hints.get(name)
    for arg in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(arg):
            return arg
    return hint


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    where = f" (from {source})" if source else ""
    if isinstance(err, ConfigKeyError) or "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(schema, parent)
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        listing = f" Valid keys here: {', '.join(sorted(valid))}." if valid else ""
        return ConfigError(f"unknown config key '{key}'{where}{hint}.{listing}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{key}'{where}: {msg}")
    return ConfigError(f"config error at '{key}'{where}: {msg}")


def load_config(
    schema: type[T] | T,
    yaml_paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> T:
    """Build a ``schema`` instance from YAML files (merged in order) and ``key=value`` overrides.

    ``schema`` is a dataclass type, or an instance whose values are the defaults to merge onto.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    for path in yaml_paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # yaml syntax errors come in several exception types
            raise ConfigError(f"cannot parse YAML {path}: {exc}") from exc
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema, str(path)) from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key=value (e.g. train.max_duration=100ba)"
            )
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "command line") from exc
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, "") from exc
    assert isinstance(obj, schema if isinstance(schema, type) else type(schema))
    return obj


def config_from_dict(schema: type[T], values: dict[str, Any], source: str = "") -> T:
    """Build a ``schema`` instance from a plain nested dict, with the same strict checks."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(values))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema, source) from exc
    assert isinstance(obj, schema)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (for logging and saving)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
