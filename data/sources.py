"""Corpus sources: where documents come from and how each format is read.

A source is one path (a file, a folder, or a glob) in one format:

- ``text``: plain UTF-8 files; one document per file, or per blank-line paragraph.
- ``jsonl``: JSON Lines (optionally ``.gz`` / ``.zst``), the document in ``text_field``.
- ``parquet``: a Parquet file, the document in column ``text_field``.
- ``hf``: a folder written by ``datasets.Dataset.save_to_disk``.
- ``chat``: JSON Lines of ``{"messages": [{"role", "content"}]}`` (UltraChat's schema),
  rendered in ChatML.

Documents come out in a fixed order (sources in the order given, files sorted), which is
what makes conversion reproducible. Bad input raises ``SourceError`` naming the file and
line; with ``skip_bad`` it is counted and listed instead.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import io
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from common.cli import RunStopped
from common.config import config_from_dict
from data.tokenizer import CHAT_ROLES, IM_END, IM_START

FORMATS = ("text", "jsonl", "parquet", "hf", "chat")
TEXT_SPLITS = ("file", "paragraph")
_SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".rst": "text",
    ".py": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".zst")


class SourceError(ValueError):
    """Bad input data; the message names the file (and line or row) and what is wrong."""


class DamagedSource(RunStopped):
    """A source file whose bytes are damaged (a cut or corrupt compressed stream): a fault, exit 3."""


class ChatDoc(NamedTuple):
    """A conversation: (role, content) pairs, rendered in ChatML when tokenized."""

    messages: tuple[tuple[str, str], ...]


Document = str | ChatDoc


@dataclass
class SourceSpec:
    """One corpus source. On the command line: ``--source path=P,format=jsonl,weight=0.6``."""

    path: str = ""
    format: str = "auto"  # auto (by suffix) | text | jsonl | parquet | hf | chat
    name: str = ""  # for reports; defaults to the path's stem
    text_field: str = "text"  # jsonl / parquet / hf: the field holding the document
    messages_field: str = "messages"  # chat: the field holding the message list
    text_split: str = "file"  # text: one document per file | per blank-line paragraph
    hf_split: str = "train"  # hf: the split, when the folder holds a DatasetDict
    weight: float = 1.0  # tokenizer training: this source's share of the text mix

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("source path is empty: pass --source path=FILE_OR_FOLDER[,format=...]")
        if self.format != "auto" and self.format not in FORMATS:
            raise ValueError(
                f"source format={self.format!r} for {self.path} is unknown; use auto or one of {', '.join(FORMATS)}"
            )
        if self.text_split not in TEXT_SPLITS:
            raise ValueError(f"source text_split={self.text_split!r} must be one of {', '.join(TEXT_SPLITS)}")
        if not self.weight > 0:
            raise ValueError(f"source weight={self.weight} for {self.path} must be > 0")
        if not self.name:
            self.name = _stem(Path(self.path))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*_COMPRESSIONS, *_SUFFIX_FORMATS):
        name = name.removesuffix(suffix)
    return name or str(path)


def parse_source(arg: str) -> SourceSpec:
    """Parse ``key=value,key=value`` (or a bare path) into a checked SourceSpec."""
    if "=" not in arg:
        return SourceSpec(path=arg)
    values: dict[str, Any] = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(
                f"--source {arg!r}: item {item!r} is not key=value (e.g. path=data/en.jsonl,weight=0.6)"
            )
        values[key.strip()] = value.strip()
    return config_from_dict(SourceSpec, values, source=f"--source {arg}")


@dataclass
class BadRecords:
    """Collects skipped input under ``--skip-bad``; without it, the first problem is raised."""

    skip: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    flag: str | None = "--skip-bad"  # the command's flag that skips bad records, if it has one

    def report(self, file: str | Path, line: int | None, reason: str, damaged: bool = False) -> None:
        """Record a bad record under ``skip``; otherwise raise ``SourceError`` (a mistake in the data),
        or ``DamagedSource`` when the file's bytes are ``damaged`` (a fault: fetch it again)."""
        where = f"{file}:{line}" if line is not None else str(file)
        if not self.skip:
            hint = f" (pass {self.flag} to skip such records and list them)" if self.flag else ""
            raise (DamagedSource if damaged else SourceError)(f"{where}: {reason}{hint}")
        self.records.append({"file": str(file), "line": line, "reason": reason})


def source_format(path: Path, declared: str) -> str:
    """The format of one file: declared, or guessed from its suffix (``.jsonl.gz`` -> jsonl)."""
    if declared != "auto":
        return declared
    if _is_hf_dir(path):
        return "hf"
    name = path.name
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    fmt = _SUFFIX_FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise SourceError(
            f"{path}: unknown source format (suffix {Path(name).suffix or 'none'!r}); "
            f"pass format=one of {', '.join(FORMATS)} in --source"
        )
    return fmt


def _is_hf_dir(path: Path) -> bool:
    """A folder written by ``datasets``' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / m).is_file() for m in ("dataset_info.json", "dataset_dict.json"))


def resolve_files(spec: SourceSpec) -> list[Path]:
    """The files of a source in reading order: a file, a folder's files (sorted, recursive), or a glob."""
    path = Path(spec.path)
    if any(ch in spec.path for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(spec.path, recursive=True) if Path(p).is_file())
        if not files:
            raise SourceError(f"{spec.path}: the pattern matches no file")
        return files
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir() and spec.format != "hf" and not _is_hf_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise SourceError(f"{path}: the folder holds no file")
        return files
    return [path]


def iter_documents(spec: SourceSpec, bad: BadRecords) -> Iterator[Document]:
    """Every document of a source, in order."""
    for file in resolve_files(spec):
        fmt = source_format(file, spec.format)
        reader = {
            "text": _read_text,
            "jsonl": _read_jsonl,
            "chat": _read_chat,
            "parquet": _read_parquet,
            "hf": _read_hf,
        }[fmt]
        yield from reader(file, spec, bad)


def chat_pieces(messages: tuple[tuple[str, str], ...]) -> list[tuple[str, bool]]:
    """ChatML as (text, is_special) pieces: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn."""
    pieces: list[tuple[str, bool]] = []
    for role, content in messages:
        pieces += [(IM_START, True), (f"{role}\n{content}", False), (IM_END, True), ("\n", False)]
    return pieces


def render_chatml(messages: tuple[tuple[str, str], ...]) -> str:
    return "".join(text for text, _ in chat_pieces(messages))


def document_text(doc: Document) -> str:
    """A document as one string (ChatML rendered), for reports and references."""
    return doc if isinstance(doc, str) else render_chatml(doc.messages)


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return path.open("rb")


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file's text, frame after frame; a file cut inside a frame raises ``EOFError``, as
    gzip does (python-zstandard's ``stream_reader`` returns end-of-file there, without a word)."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._raw = path.open("rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._started = False  # whether the current frame has received input
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._frame.eof:
                self._frame = self._dctx.decompressobj()
            parts.append(self._frame.decompress(data))
            self._started = True
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        while not len(self._out):
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._started and not self._frame.eof:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self._out = memoryview(self._feed(chunk))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _check_nonempty(path: Path, bad: BadRecords) -> bool:
    try:
        size = path.stat().st_size
    except OSError as exc:
        bad.report(path, None, f"cannot read the file ({exc.strerror})")
        return False
    if size == 0:
        bad.report(path, None, "the file is empty")
        return False
    return True


def _read_text(path: Path, spec: SourceSpec, bad: BadRecords) -> Iterator[str]:
    if not _check_nonempty(path, bad):
        return
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        bad.report(path, None, f"cannot read the file ({exc.strerror})")
        return
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad.report(path, line, f"not valid UTF-8 (byte {exc.start})")
        return
    if spec.text_split == "file":
        yield text
    else:
        yield from (para for para in text.split("\n\n") if para.strip())


def _json_lines(path: Path, bad: BadRecords) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; bad lines go to ``bad``."""
    if not _check_nonempty(path, bad):
        return
    seen_any = False
    try:
        with _open_binary(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                seen_any = True
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError as exc:
                    bad.report(path, lineno, f"not valid UTF-8 ({exc.reason})")
                    continue
                except json.JSONDecodeError as exc:
                    bad.report(path, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})")
                    continue
                if not isinstance(obj, dict):
                    bad.report(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
    except EOFError as exc:  # gzip and zstd (_ZstdReader) name a cut stream so
        bad.report(path, None, f"the file is truncated ({exc}): fetch or compress it again", damaged=True)
        return
    except OSError as exc:
        bad.report(path, None, f"cannot read the file ({exc})")
        return
    except Exception as exc:  # zstandard raises its own ZstdError for corrupt frames
        if type(exc).__module__.startswith("zstandard"):
            bad.report(path, None, f"cannot decompress the file ({exc}): fetch it again", damaged=True)
            return
        raise
    if not seen_any:
        bad.report(path, None, "the file holds no JSON line")


def _read_jsonl(path: Path, spec: SourceSpec, bad: BadRecords) -> Iterator[str]:
    for lineno, obj in _json_lines(path, bad):
        if spec.text_field not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            bad.report(
                path, lineno, f"no field {spec.text_field!r} (keys: {keys}); set text_field= in --source"
            )
            continue
        text = obj[spec.text_field]
        if not isinstance(text, str):
            bad.report(path, lineno, f"field {spec.text_field!r} is {type(text).__name__}, expected a string")
            continue
        yield text


def _read_chat(path: Path, spec: SourceSpec, bad: BadRecords) -> Iterator[ChatDoc]:
    field_name = spec.messages_field
    for lineno, obj in _json_lines(path, bad):
        messages = obj.get(field_name)
        if not isinstance(messages, list) or not messages:
            keys = ", ".join(sorted(obj)) or "none"
            bad.report(path, lineno, f"no non-empty list {field_name!r} (keys: {keys}); set messages_field=")
            continue
        turns: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in CHAT_ROLES or not isinstance(content, str):
                bad.report(
                    path,
                    lineno,
                    f"message {i} needs a role in {CHAT_ROLES} and a string content, got {message!r:.80}",
                )
                break
            turns.append((role, content))
        else:
            yield ChatDoc(tuple(turns))


def _read_parquet(path: Path, spec: SourceSpec, bad: BadRecords) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not _check_nonempty(path, bad):
        return
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        bad.report(path, None, f"cannot read the Parquet file ({exc})")
        return
    names = parquet.schema_arrow.names
    if spec.text_field not in names:
        bad.report(
            path, None, f"no column {spec.text_field!r} (columns: {', '.join(names)}); set text_field="
        )
        return
    values = (
        v
        for batch in parquet.iter_batches(batch_size=4096, columns=[spec.text_field])
        for v in batch.column(0).to_pylist()
    )
    if not (yield from _string_column(values, path, spec.text_field, bad)):
        bad.report(path, None, "the Parquet file holds no row")


def _read_hf(path: Path, spec: SourceSpec, bad: BadRecords) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        bad.report(path, None, f"cannot load the datasets folder ({exc})")
        return
    if isinstance(dataset, datasets.DatasetDict):
        if spec.hf_split not in dataset:
            raise SourceError(
                f"{path}: no split {spec.hf_split!r} (splits: {', '.join(dataset)}); set hf_split="
            )
        dataset = dataset[spec.hf_split]
    if spec.text_field not in dataset.column_names:
        cols = ", ".join(dataset.column_names)
        bad.report(path, None, f"no column {spec.text_field!r} (columns: {cols}); set text_field=")
        return
    batches = dataset.select_columns([spec.text_field]).iter(batch_size=4096)
    yield from _string_column(
        (v for batch in batches for v in batch[spec.text_field]), path, spec.text_field, bad
    )


def _string_column(
    values: Iterator[object], path: Path, field: str, bad: BadRecords
) -> Generator[str, None, int]:
    """Yield the strings of a table column (rows numbered from 1), reporting other values; returns the row count."""
    row = 0
    for row, value in enumerate(values, start=1):
        if isinstance(value, str):
            yield value
        else:
            bad.report(path, row, f"column {field!r} is {type(value).__name__}, expected a string")
    return row


def spec_fields() -> list[str]:
    """The keys ``--source`` accepts (for help text)."""
    return [f.name for f in dataclasses.fields(SourceSpec)]
