"""Sources: every format reads its documents in order; bad input fails naming file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from common.config import ConfigError
from data.sources import (
    BadRecords,
    ChatDoc,
    DamagedSource,
    SourceError,
    SourceSpec,
    iter_documents,
    parse_source,
    render_chatml,
)
from tests.data_helpers import make_chats, write_jsonl

DOCS = ["première ligne\navec accents é", "second\tdoc  ", 'third {json} "quotes"']


def read(spec: SourceSpec, skip: bool = False) -> tuple[list, BadRecords]:
    bad = BadRecords(skip=skip)
    return list(iter_documents(spec, bad)), bad


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_compressed_or_not(tmp_path: Path, suffix: str) -> None:
    raw = "".join(
        f'{{"id": {i}, "body": {__import__("json").dumps(d)}}}\n' for i, d in enumerate(DOCS)
    ).encode()
    path = tmp_path / f"docs{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif suffix.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    docs, _ = read(SourceSpec(path=str(path), text_field="body"))
    assert docs == DOCS


def test_text_files_folder_and_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("B one\n\nB two\n")
    (tmp_path / "a.txt").write_text("A\n")
    docs, _ = read(SourceSpec(path=str(tmp_path)))
    assert docs == ["A\n", "B one\n\nB two\n"]  # sorted by name, one document per file
    docs, _ = read(SourceSpec(path=str(tmp_path / "b.txt"), text_split="paragraph"))
    assert docs == ["B one", "B two\n"]


def test_parquet_and_hf_folder(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    docs, _ = read(SourceSpec(path=str(tmp_path / "d.parquet")))
    assert docs == DOCS
    import datasets

    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "hf"))
    docs, _ = read(SourceSpec(path=str(tmp_path / "hf"), text_field="content"))
    assert docs == DOCS


def test_chat_renders_chatml(tmp_path: Path) -> None:
    chats = make_chats(3)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    docs, _ = read(SourceSpec(path=str(path), format="chat"))
    assert docs == [ChatDoc(tuple((m["role"], m["content"]) for m in c)) for c in chats]
    assert render_chatml(docs[0].messages).startswith("<|im_start|>")


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:3: malformed JSON"):
        read(SourceSpec(path=str(path)))
    docs, bad = read(SourceSpec(path=str(path)), skip=True)
    assert docs == ["ok", "fine"]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in bad.records] == [(3, "malformed JSON")]


def test_missing_text_field_names_file_line_and_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"content": "b"}])
    with pytest.raises(SourceError, match=r"f\.jsonl:2: no field 'text' \(keys: content\)"):
        read(SourceSpec(path=str(path)))
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": 3}])
    with pytest.raises(SourceError, match=r"g\.jsonl:1: field 'text' is int"):
        read(SourceSpec(path=str(path)))


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SourceError, match=r"empty\.jsonl: the file is empty"):
        read(SourceSpec(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match=r"blank\.jsonl: the file holds no JSON line"):
        read(SourceSpec(path=str(tmp_path / "blank.jsonl")))
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin\.txt:2: not valid UTF-8"):
        read(SourceSpec(path=str(tmp_path / "latin.txt")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad\.parquet: cannot read the Parquet file"):
        read(SourceSpec(path=str(tmp_path / "bad.parquet")))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_truncated_compressed_source_is_named_as_damaged(tmp_path: Path, suffix: str) -> None:
    """python-zstandard's stream reader ends a cut frame silently; both formats must say "truncated"."""
    raw = b"".join(b'{"text": "document %d"}\n' % i for i in range(2000))
    packed = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    whole, cut = tmp_path / f"whole.jsonl{suffix}", tmp_path / f"cut.jsonl{suffix}"
    whole.write_bytes(packed)
    cut.write_bytes(packed[: len(packed) // 2])
    assert len(read(SourceSpec(path=str(whole)))[0]) == 2000
    with pytest.raises(DamagedSource, match=rf"cut\.jsonl\{suffix}: the file is truncated"):
        read(SourceSpec(path=str(cut)))
    bad = BadRecords(skip=True)
    kept = list(iter_documents(SourceSpec(path=str(cut)), bad))
    assert len(kept) < 2000  # what came before the cut (zstd decodes whole blocks only)
    assert [(r["file"], r["line"]) for r in bad.records] == [(str(cut), None)]
    assert bad.records[0]["reason"].startswith("the file is truncated")


def test_skip_bad_counts_and_lists_across_files(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    write_jsonl(folder / "b.jsonl", [{"text": "good"}, {"txt": "bad"}])
    docs, bad = read(SourceSpec(path=str(folder)), skip=True)
    assert docs == ["good"]
    assert [(Path(r["file"]).name, r["line"]) for r in bad.records] == [("a.jsonl", None), ("b.jsonl", 2)]


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(
        SourceError, match=r"data\.xml: unknown source format \(suffix '\.xml'\); pass format="
    ):
        read(SourceSpec(path=str(tmp_path / "data.xml")))
    with pytest.raises(SourceError, match=r"nope\.jsonl: no such file or folder"):
        read(SourceSpec(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match=r"format='xml'.*unknown"):
        SourceSpec(path="x", format="xml")


def test_bad_chat_message(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
        ],
    )
    with pytest.raises(SourceError, match=r"c\.jsonl:2: message 0 needs a role in"):
        read(SourceSpec(path=str(path), format="chat"))


def test_parse_source_suggests_key() -> None:
    assert parse_source("path=a.jsonl,weight=0.6,text_field=body").weight == 0.6
    with pytest.raises(ConfigError, match=r"did you mean 'text_field'"):
        parse_source("path=a.jsonl,txt_field=body")
