"""The layers point one way: read from the sources' import statements (ast), nothing imported.

Entry points (``recipes/``) sit on top of the library folders; a library folder never imports
``recipes``, and no module reaches itself through its imports: every import counts, the ones inside
a function and under ``TYPE_CHECKING`` too, since a cycle that only a lazy import hides is still a
cycle for a reader.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("common", "models", "data", "callbacks", "handover", "eval")
PACKAGES = (*LIBRARY, "recipes")
# Which library folder may import which: each only from the ones listed (none from recipes).
ALLOWED = {
    "common": set(),
    "models": {"common"},
    "data": {"common"},
    "callbacks": {"common"},
    "handover": {"common", "models", "data", "callbacks"},
    "eval": {"common", "models", "data", "callbacks", "handover"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, str | None]]:
    """(module, line, name) for every first-party import in ``path``; ``name`` is what a ``from``
    import takes from a module (None for ``import x`` and for submodules)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, node.lineno, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    yield sub, node.lineno, None
                else:
                    yield node.module, node.lineno, alias.name


def graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {
        name: {m for m, _, _ in imports(path, known) if m in known and m != name}
        for name, path in known.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@functools.cache  # every import of a module asks again: parse each module once
def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (including under ``if`` / ``try``)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If | ast.Try):
            pending.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            pending.extend(b for h in getattr(node, "handlers", []) for b in h.body)
    return names


def test_library_folders_never_import_upward() -> None:
    known = modules()
    wrong = []
    for name, path in known.items():
        folder = name.split(".")[0]
        if folder not in ALLOWED:
            continue
        for target, line, _ in imports(path, known):
            other = target.split(".")[0]
            if other != folder and other not in ALLOWED[folder]:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line} imports {target} ({folder}/ may import {sorted(ALLOWED[folder])})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import cycles (TYPE_CHECKING and function-level imports included): " + "; ".join(
        " <-> ".join(group) for group in found
    )


def test_every_first_party_import_names_something_that_exists() -> None:
    """A moved function or module leaves no import behind that would fail only when it runs."""
    known = modules()
    scanned = {
        **known,
        **{module_name(p): p for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")},
    }
    missing = []
    for path in scanned.values():
        for target, line, name in imports(path, known):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in known:
                missing.append(f"{where}: no module {target}")
            elif name is not None and name != "*" and name not in defined_names(known[target]):
                missing.append(f"{where}: {target} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The same functions on a planted tree: an upward import and a cycle hidden under TYPE_CHECKING."""
    for pkg in ("models", "recipes"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "models" / "a.py").write_text("def f():\n    from recipes.b import g\n")
    (tmp_path / "recipes" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from models import a\ndef g():\n    pass\n"
    )
    edges = graph(tmp_path, ("models", "recipes"))
    assert edges["models.a"] == {"recipes.b"}
    assert edges["recipes.b"] == {"models.a"}
    assert cycles(edges) == [["models.a", "recipes.b"]]
    known = modules(tmp_path, ("models", "recipes"))
    assert [(m, n) for m, _, n in imports(known["models.a"], known)] == [("recipes.b", "g")]
    assert "g" in defined_names(known["recipes.b"])
