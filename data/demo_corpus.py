"""The built-in demo corpus, made offline from the Python standard library.

    python -m data.demo_corpus --out runs/demo/src

writes three JSON Lines sources:

- ``code.jsonl``: standard-library modules, one file per document (code);
- ``prose.jsonl``: the language reference that ``pydoc_data/topics.py`` carries (English
  prose), then module docstrings;
- ``chat.jsonl``: a few hundred synthetic ChatML conversations ({"messages": [...]}) that ask
  about those reference topics, the small instruction stream of the demo's decay phase.

Files are read in sorted order and cut at a byte budget, so the corpus is the same on every
machine with the same Python version, and small enough to tokenize in seconds.
"""

from __future__ import annotations

import ast
import itertools
import json
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import cli
from common.io import atomic_dir, check_output_path

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
}
_SYSTEM = "You are a concise assistant who explains Python."


def stdlib_files() -> list[Path]:
    """Standard-library ``.py`` files in sorted order, without tests and bundled packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def code_documents(files: Sequence[Path], budget: int) -> Iterator[dict[str, str]]:
    size = 0
    for path in files:
        if size >= budget:
            return
        text = _read_source(path)
        if text:
            size += len(text.encode("utf-8"))
            yield {"text": text, "path": path.name}


def _reference_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def _module_docstrings(files: Sequence[Path]) -> Iterator[str]:
    """Per module, its docstring and its longer class and function docstrings, as one text."""
    for path in files:
        text = _read_source(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
        docs = [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) > 200]
        if docs:
            yield "\n\n".join(docs)


def prose_documents(files: Sequence[Path], budget: int) -> Iterator[dict[str, str]]:
    size = 0
    for text in itertools.chain(_reference_topics().values(), _module_docstrings(files)):
        if size >= budget:
            return
        size += len(text.encode("utf-8"))
        yield {"text": text}


def _paragraphs(text: str) -> list[str]:
    """A reference topic's paragraphs of prose, without its title and underline."""
    return [p.strip() for p in text.split("\n\n")[1:] if len(p.strip()) > 40 and "****" not in p]


def chat_documents(count: int) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Deterministic conversations: a question on a reference topic, answered from its text."""
    topics = list(_reference_topics().items())
    for i in range(min(count, len(topics) * 2)):
        name, text = topics[i % len(topics)]
        title = text.strip().splitlines()[0].strip() or name
        messages = [{"role": "system", "content": _SYSTEM}] if i % 3 == 0 else []
        paragraphs = _paragraphs(text) or [title]
        messages += [
            {"role": "user", "content": f"What does the Python reference say about {title!r}?"},
            {"role": "assistant", "content": paragraphs[0][:700]},
        ]
        if i >= len(topics):  # the second pass over the topics asks a follow-up question
            messages += [
                {"role": "user", "content": "Tell me more."},
                {"role": "assistant", "content": paragraphs[min(1, len(paragraphs) - 1)][:700]},
            ]
        yield {"messages": messages}


def _write_jsonl(path: Path, rows: Iterator[dict]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def build_demo_corpus(
    out: str | Path, code_bytes: int, prose_bytes: int, chats: int, overwrite: bool = False
) -> dict[str, int]:
    """Write code.jsonl, prose.jsonl and chat.jsonl into ``out``; returns documents per file."""
    files = stdlib_files()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        counts = {
            "code": _write_jsonl(tmp / "code.jsonl", code_documents(files, code_bytes)),
            "prose": _write_jsonl(tmp / "prose.jsonl", prose_documents(files, prose_bytes)),
            "chat": _write_jsonl(tmp / "chat.jsonl", chat_documents(chats)),
        }
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m data.demo_corpus", __doc__)
    parser.add_argument("--out", required=True, help="output folder for code.jsonl, prose.jsonl, chat.jsonl")
    parser.add_argument("--code-mb", type=float, default=3.0, help="MB of standard-library source to include")
    parser.add_argument(
        "--prose-mb", type=float, default=1.5, help="MB of reference text and docstrings to include"
    )
    parser.add_argument("--chats", type=int, default=150, help="synthetic ChatML conversations")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    for flag, value in (("--code-mb", args.code_mb), ("--prose-mb", args.prose_mb), ("--chats", args.chats)):
        if not value > 0:  # the demo's mixture reads all three files
            raise cli.UserError(f"{flag} {value} must be > 0 (omit it for the default)")
    check_output_path(args.out, "--out", overwrite=args.overwrite)
    counts = build_demo_corpus(
        args.out, int(args.code_mb * 1e6), int(args.prose_mb * 1e6), args.chats, overwrite=args.overwrite
    )
    documents = ", ".join(f"{count} {name}" for name, count in counts.items())
    print(f"demo corpus {args.out}: {documents} documents ({', '.join(f'{n}.jsonl' for n in counts)})")


if __name__ == "__main__":
    cli.run(main)
