"""Strict structured configs: dataclass schema + YAML files + CLI ``key=value`` overrides.

Every section of every config in this repository is a dataclass. ``load_config`` merges YAML
files and dotlist overrides onto the schema with omegaconf, then converts the result back to
dataclass objects, so ``__post_init__`` cross-field checks run on the final values.

User mistakes surface as ``ConfigError`` (a ``ValueError``) naming the offending key, the bad
value and the fix, e.g. ``unknown config key 'optimzer' (did you mean 'optimizer'?)``. A config
with several mistakes reports all of them at once: merge errors are collected leaf by leaf, and
the sections' ``__post_init__`` checks report through ``report`` which, inside
``collect_problems``, records instead of raising.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from common.cli import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake; the message names the key and the fix."""

    def __init__(self, *problems: str) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            listed = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{len(problems)} problems in the configuration:\n{listed}")


# ----------------------------------------------------------------------------------------------
# Cross-field checks that can report every problem at once

_PROBLEMS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


def report(problems: Iterable[str]) -> None:
    """Raise ``ConfigError`` for ``problems``, or record them inside ``collect_problems()``.

    Config dataclasses call this at the end of ``__post_init__`` with everything they found.
    """
    problems = list(problems)
    sink = _PROBLEMS.get()
    if sink is not None:
        sink.extend(problems)
    elif problems:
        raise ConfigError(*problems)


@contextlib.contextmanager
def collect_problems() -> Iterator[list[str]]:
    """Inside this block ``report`` records problems in the yielded list instead of raising."""
    sink: list[str] = []
    token = _PROBLEMS.set(sink)
    try:
        yield sink
    finally:
        _PROBLEMS.reset(token)


# ----------------------------------------------------------------------------------------------
# Explaining omegaconf's errors


def _resolve_type(owner: Any, name: str) -> Any:
    hints = typing.get_type_hints(owner if isinstance(owner, type) else type(owner))
    hint = hints.get(name)
    for arg in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(arg):
            return arg
    return hint


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


def explain(err: OmegaConfBaseException, schema: Any, source: str = "", prefix: str = "") -> ConfigError:
    """An omegaconf error as a ``ConfigError`` naming the full key (``prefix.key``) and the fix."""
    key = getattr(err, "full_key", None) or ""
    shown = ".".join(p for p in (prefix, key) if p)
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]
    where = f" (from {source})" if source else ""
    if isinstance(err, ConfigKeyError) or "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys(schema, parent)
        close = difflib.get_close_matches(leaf, valid, n=1)
        base = ".".join(p for p in (prefix, parent) if p)
        hint = f" (did you mean '{base + '.' if base else ''}{close[0]}'?)" if close else ""
        listing = f" Valid keys here: {', '.join(sorted(valid))}." if valid else ""
        return ConfigError(f"unknown config key '{shown}'{where}{hint}.{listing}")
    if isinstance(err, ValidationError):
        return ConfigError(f"bad value for config key '{shown}'{where}: {msg}")
    return ConfigError(f"config error at '{shown}'{where}: {msg}")


# ----------------------------------------------------------------------------------------------
# Loading


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf of a plain nested mapping (lists and empty mappings are leaves)."""
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _nest(path: tuple[str, ...], value: Any) -> Any:
    for key in reversed(path):
        value = {key: value}
    return value


def _merge_collecting(
    merged: DictConfig, new: Any, schema: Any, source: str, problems: list[str]
) -> DictConfig:
    """Merge ``new`` onto ``merged``; if that fails, merge leaf by leaf and record every failure."""
    try:
        return OmegaConf.merge(merged, new)
    except OmegaConfBaseException:
        pass
    plain = OmegaConf.to_container(new) if OmegaConf.is_config(new) else new
    for path, value in _leaves(plain):
        try:
            merged = OmegaConf.merge(merged, _nest(path, value))
        except OmegaConfBaseException as exc:
            problems.append(str(explain(exc, schema, source)))
    return merged


def _as_object(merged: DictConfig, schema: Any, problems: list[str]) -> Any:
    """The dataclass object of ``merged``; raises one ``ConfigError`` with ``problems`` and any it finds."""
    problems = list(problems)
    problems += [
        f"config key '{key}' has no value: set it in the recipe or as {key}=... on the command line"
        for key in sorted(OmegaConf.missing_keys(merged))
    ]
    obj = None
    if not problems or not OmegaConf.missing_keys(merged):
        with collect_problems() as found:
            try:
                obj = OmegaConf.to_object(merged)
            except OmegaConfBaseException as exc:
                found.append(str(explain(exc, schema)))
        problems += found
    if problems:
        raise ConfigError(*problems)
    return obj


def load_sources(schema: type[T] | T, sources: Sequence[tuple[str, Any]]) -> T:
    """Build a ``schema`` instance from ``(label, node)`` sources merged in order.

    A node is a mapping or an omegaconf node; the label (a file name, "command line") is used
    in messages. Every problem found (unknown keys, wrong types, failed cross-field checks) is
    reported at once in one ``ConfigError``.
    """
    merged: DictConfig = OmegaConf.structured(schema)
    problems: list[str] = []
    for label, node in sources:
        merged = _merge_collecting(merged, node, schema, label, problems)
    obj = _as_object(merged, schema, problems)
    assert isinstance(obj, schema if isinstance(schema, type) else type(schema))
    return obj


def load_yaml(path: str | Path, what: str = "recipe") -> DictConfig:
    """A YAML mapping from ``path``; anything else (a syntax error, a list, a scalar) is one ``ConfigError``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = exc.problem or exc.context or "not valid YAML"
        hint = "; YAML does not allow tabs: indent with spaces" if "\\t" in problem or "\t" in problem else ""
        raise ConfigError(f"cannot parse YAML {path}{where}: {problem}{hint}") from exc
    except Exception as exc:  # a file that is not text at all, or yaml's other errors
        raise ConfigError(
            f"cannot parse YAML {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if not OmegaConf.is_dict(node):
        kind = "a list" if OmegaConf.is_list(node) else "not a mapping"
        raise ConfigError(
            f"{what} {path} is {kind}; a {what} is a mapping of keys to values (e.g. `max_duration: 100ba`)"
        )
    return node


def read_sources(yaml_paths: Sequence[str | Path], overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """YAML files and ``key=value`` overrides as ``(label, node)`` sources; unreadable ones fail together."""
    sources: list[tuple[str, Any]] = []
    problems: list[str] = []
    for path in map(Path, yaml_paths):
        try:
            sources.append((str(path), load_yaml(path)))
        except ConfigError as exc:
            problems += exc.problems
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}' is not of the form key=value (e.g. max_duration=100ba)")
            continue
        try:
            sources.append(("command line", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            problems.append(f"cannot parse the override '{item}': {exc}")
    if problems:
        raise ConfigError(*problems)
    return sources


def load_config(
    schema: type[T] | T,
    yaml_paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> T:
    """Build a ``schema`` instance from YAML files (merged in order) and ``key=value`` overrides.

    ``schema`` is a dataclass type, or an instance whose values are the defaults to merge onto.
    """
    return load_sources(schema, read_sources(yaml_paths, overrides))


def config_from_dict(schema: type[T], values: dict[str, Any], source: str = "") -> T:
    """Build a ``schema`` instance from a plain nested dict, with the same strict checks."""
    problems: list[str] = []
    merged = _merge_collecting(
        OmegaConf.structured(schema), OmegaConf.create(values), schema, source, problems
    )
    obj = _as_object(merged, schema, problems)
    assert isinstance(obj, schema)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (for logging and saving)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]
