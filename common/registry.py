"""Registries: the parts a recipe chooses among by name (schedulers, algorithms, callbacks, loggers).

A recipe names a registered part and passes it keyword arguments, as llm-foundry recipes do::

    callbacks:
      memory_monitor: {}
      loss_spike: {window: 100}
    loggers:
      wandb: {project: mamba, entity: my-team, tags: [ablation]}

The part's constructor is its only definition: the registry derives a typed schema from its
signature (annotations and defaults), merges the recipe's arguments onto it with omegaconf's
strict checks, and calls the constructor with the result. So a misspelt argument fails naming
``callbacks.loss_spike.windw`` and the nearest valid name, a wrong type fails naming the value,
a missing required argument fails naming it, and an unknown part fails listing the registered
ones, all before anything is built. Arguments whose annotation omegaconf cannot type (a
``Time``, a callable) are typed by their plain-YAML alternatives (``str`` for ``str | Time``)
or left untyped.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib.util
import inspect
import pathlib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config import ConfigError, explain

T = TypeVar("T")

_PRIMITIVES = (int, float, str, bool)


def _plain_type(hint: Any) -> Any:
    """The closest type omegaconf can check for a constructor annotation (``Any`` if none)."""
    if hint in _PRIMITIVES or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return hint
    if hint is pathlib.Path:
        return str
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return hint
    if origin in (typing.Union, types.UnionType):
        kept = [_plain_type(a) for a in args if a is not type(None)]
        kept = [k for k in kept if k is not Any]
        if not kept:
            return Any
        union = kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007
        return typing.Optional[union] if type(None) in args else union  # noqa: UP045
    if origin in (list, tuple) and args:
        item = _plain_type(args[0])
        return list[item] if item is not Any else list[Any]
    if origin is dict and len(args) == 2:
        value = _plain_type(args[1])
        return dict[str, value] if args[0] is str else Any
    return Any


def _plain_default(value: Any) -> bool:
    """Whether a default can live in an omegaconf schema (YAML-like values only)."""
    if value is None or isinstance(value, (*_PRIMITIVES, enum.Enum)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_default(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_default(v) for k, v in value.items())
    return False


def signature_schema(builder: Callable[..., Any], name: str, context: Sequence[str] = ()) -> type:
    """A dataclass with one field per configurable keyword argument of ``builder``.

    A parameter is configurable when it can be passed by keyword, is not supplied by the run
    (``context``), and its default (if any) is a YAML-like value; ``*args``/``**kwargs`` and
    object-valued defaults are left to the builder.
    """
    target = builder.__init__ if inspect.isclass(builder) else builder
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation naming a type that is not importable here: untyped
        hints = {}
    fields = []
    for param in inspect.signature(builder).parameters.values():
        if (
            param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY)
            or param.name in context
        ):
            continue
        if param.default is not param.empty and not _plain_default(param.default):
            continue
        hint = _plain_type(hints.get(param.name, Any))
        default = MISSING if param.default is param.empty else param.default
        if isinstance(default, (list, dict, tuple)):
            frozen = default
            fields.append((param.name, hint, dataclasses.field(default_factory=lambda v=frozen: _copy(v))))
        else:
            fields.append((param.name, hint, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{name}_args", fields)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered part: its name, the callable that builds it, a one-line description, and the
    optional packages it needs (``(module, pip requirement)``)."""

    name: str
    builder: Callable[..., Any]
    summary: str
    requires: tuple[tuple[str, str], ...] = ()
    context: tuple[str, ...] = ()  # arguments the run supplies (e.g. its folder), not the recipe

    def missing(self) -> list[str]:
        """The pip requirements of the packages this part needs that are not installed."""
        return [req for module, req in self.requires if importlib.util.find_spec(module) is None]


class Registry(Generic[T]):
    """Named builders of one kind of part, configured from ``{name: kwargs}`` recipe sections.

    Args:
        key: The recipe section the parts are chosen in (``callbacks``), for messages.
        kind: What one part is called (``callback``), for messages.
    """

    def __init__(self, key: str, kind: str) -> None:
        self.key = key
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        builder: Callable[..., T],
        summary: str = "",
        requires: Sequence[tuple[str, str]] = (),
        context: Sequence[str] = (),
    ) -> None:
        """Register ``builder`` as ``name``; ``requires`` lists ``(module, pip requirement)`` it imports,
        ``context`` the arguments the run passes to ``build`` (not settable in a recipe)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        doc = summary or (inspect.getdoc(builder) or "").split("\n\n")[0].replace("\n", " ")
        self._entries[name] = Entry(name, builder, doc, tuple(requires), tuple(context))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{self.key}: unknown {self.kind} {name!r}{hint}; registered {self.kind}s: "
                f"{', '.join(self._entries)}"
            )
        return self._entries[name]

    @functools.cache  # noqa: B019 (registries live for the whole process)
    def schema(self, name: str) -> type:
        entry = self.entry(name)
        return signature_schema(entry.builder, name, entry.context)

    def resolve(self, name: str, kwargs: Mapping[str, Any] | None, where: str = "") -> dict[str, Any]:
        """``kwargs`` checked against ``name``'s signature, with its defaults filled in.

        ``where`` is the key the arguments sit under (default ``{key}.{name}``), for messages.
        """
        where = where or f"{self.key}.{name}"
        missing = self.entry(name).missing()
        if missing:
            raise ConfigError(
                f"{where}: the {self.kind} {name!r} needs packages that are not installed: "
                f"pip install {' '.join(repr(m) for m in missing)}"
            )
        schema = self.schema(name)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(dict(kwargs or {})))
            missing = sorted(OmegaConf.missing_keys(merged))
            if missing:
                raise ConfigError(
                    f"{where}: {self.kind} {name!r} needs {', '.join(missing)}; set "
                    + ", ".join(f"{where}.{m}" for m in missing)
                )
            return OmegaConf.to_container(merged, resolve=True, enum_to_str=False)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            raise explain(exc, schema, source=f"{self.kind} {name!r}", prefix=where) from exc

    def build(self, name: str, kwargs: Mapping[str, Any] | None, where: str = "", **context: Any) -> T:
        """The part ``name`` built from ``kwargs`` (checked as ``resolve`` does) and the run's ``context``
        (the arguments the part declared as supplied by the run; others are ignored)."""
        entry = self.entry(name)
        supplied = {k: v for k, v in context.items() if k in entry.context}
        return entry.builder(**self.resolve(name, kwargs, where), **supplied)

    def problems(self, name: str, kwargs: Mapping[str, Any] | None, where: str = "") -> list[str]:
        """What ``name``'s constructor refuses in ``kwargs`` (a ``ValueError`` / ``TypeError``), found by
        building the part once and dropping it, so that a recipe's values are checked with the rest of
        the config. Parts that need the run's context (they may open files) are checked when built."""
        where = where or f"{self.key}.{name}"
        args = self.resolve(name, kwargs, where)
        if self.entry(name).context:
            return []
        try:
            self.entry(name).builder(**args)
        except (ValueError, TypeError, ImportError) as exc:  # ImportError: a package only a GPU run needs
            return [f"{where}: {exc}"]
        return []

    def describe(self) -> str:
        """One line per registered part, for ``--help``."""
        width = max((len(n) for n in self._entries), default=0)
        return "\n".join(f"  {e.name.ljust(width)}  {e.summary}" for e in self._entries.values())
