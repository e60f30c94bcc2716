"""Conversion: exact round trips through the loader, worker-count independence, safe output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import convert as convert_module
from data.shared_memory import clean_stale_shared_memory
from data.sources import SourceError, SourceSpec, render_chatml
from data.tokenizer import EOT, PAD, load_tokenizer
from tests.data_helpers import (
    convert_sources,
    expected_positions,
    make_chats,
    make_docs,
    make_tokenizer,
    read_token_stream,
    single_stream_dataset,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


def reference_stream(tok_dir: Path, texts: list[str]) -> list[int]:
    """The tokenizer's own encoding of each document, end-of-text after each, in order."""
    tok = load_tokenizer(tok_dir)
    eot = tok.token_to_id(EOT)
    stream: list[int] = []
    for text in texts:
        stream += [*tok.encode(text, add_special_tokens=False).ids, eot]
    return stream


def write_source(tmp: Path, fmt: str) -> tuple[SourceSpec, list[str]]:
    docs = make_docs(60, seed=7)
    if fmt == "text":
        folder = tmp / "txt"
        folder.mkdir()
        for i, doc in enumerate(docs):
            (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
        return SourceSpec(path=str(folder)), docs
    if fmt == "jsonl":
        return SourceSpec(
            path=str(write_jsonl(tmp / "d.jsonl", [{"t": d} for d in docs])), text_field="t"
        ), docs
    if fmt == "parquet":
        pq.write_table(pa.table({"text": docs}), tmp / "d.parquet")
        return SourceSpec(path=str(tmp / "d.parquet")), docs
    chats = make_chats(40, seed=3)
    path = write_jsonl(tmp / "chat.jsonl", [{"messages": c} for c in chats])
    rendered = [render_chatml(tuple((m["role"], m["content"]) for m in c)) for c in chats]
    return SourceSpec(path=str(path), format="chat"), rendered


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "chat"])
def test_round_trip_through_loader(tmp_path: Path, tok_dir: Path, fmt: str) -> None:
    spec, texts = write_source(tmp_path, fmt)
    seq_len = 32
    stats = convert_sources(tmp_path / "mds", tok_dir, [spec], seq_len=seq_len)
    expected = reference_stream(tok_dir, texts)
    tok = load_tokenizer(tok_dir)
    eot, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    dataset = single_stream_dataset(tmp_path, tmp_path / "mds", tok_dir)
    assert read_token_stream(dataset, pad) == expected
    assert stats["splits"]["train"]["documents"] == len(texts)
    assert stats["splits"]["train"]["tokens"] == len(expected)

    # Labels are the inputs shifted by one; positions count from each document's first token.
    padded = np.array(expected + [pad] * (-len(expected) % (seq_len + 1)))
    positions = expected_positions(padded, eot)
    for i, example in enumerate(dataset):
        window = padded[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        assert example["input_ids"].tolist() == window[:-1].tolist()
        labels = np.where(window[1:] == pad, -100, window[1:])
        assert example["labels"].tolist() == labels.tolist()
        real = window[:-1] != pad
        assert (
            example["position_ids"].numpy()[real].tolist()
            == positions[i * (seq_len + 1) :][:seq_len][real].tolist()
        )


def test_literal_special_text_stays_data(tmp_path: Path, tok_dir: Path) -> None:
    docs = [f"one {EOT} two", "plain", f"{PAD}{EOT}"]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    convert_sources(tmp_path / "mds", tok_dir, [SourceSpec(path=str(path))], seq_len=16)
    tok = load_tokenizer(tok_dir)
    tokens = read_token_stream(
        single_stream_dataset(tmp_path, tmp_path / "mds", tok_dir), tok.token_to_id(PAD)
    )
    assert tokens.count(tok.token_to_id(EOT)) == len(docs)
    assert tok.decode(tokens, skip_special_tokens=False) == "".join(d + EOT for d in docs)


def test_one_and_two_workers_write_identical_bytes(tmp_path: Path, tok_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(400, seed=11)])
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"mds{workers}"
        convert_sources(
            out, tok_dir, [SourceSpec(path=str(path))], workers=workers, val_fraction=0.2, batch_bytes=500
        )
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert {p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file()} == set(files)
    assert len([f for f in files if f.suffix == ".zstd"]) >= 2
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_validation_split_partitions_documents(tmp_path: Path, tok_dir: Path) -> None:
    docs = list(dict.fromkeys(make_docs(300, seed=13)))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    stats = convert_sources(tmp_path / "mds", tok_dir, [SourceSpec(path=str(path))], val_fraction=0.25)
    tok = load_tokenizer(tok_dir)
    pad = tok.token_to_id(PAD)
    split_docs = {}
    for split in ("train", "val"):
        tokens = read_token_stream(
            single_stream_dataset(tmp_path, tmp_path / "mds", tok_dir, split=split), pad
        )
        split_docs[split] = tok.decode(tokens, skip_special_tokens=False).split(EOT)[:-1]
        assert stats["splits"][split]["documents"] == len(split_docs[split])
    assert 0.15 < len(split_docs["val"]) / len(docs) < 0.35
    assert sorted(split_docs["train"] + split_docs["val"]) == sorted(docs)
    held_out = set(split_docs["val"])
    assert split_docs["train"] == [d for d in docs if d not in held_out]  # order kept


def test_stores_two_bytes_per_token(tmp_path: Path, tok_dir: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(3000, seed=17)])
    stats = convert_sources(tmp_path / "mds", tok_dir, [SourceSpec(path=str(path))], seq_len=2047)
    index = json.loads((tmp_path / "mds" / "train" / "index.json").read_text())
    columns = [dict(zip(s["column_names"], s["column_encodings"])) for s in index["shards"]]
    assert all(
        c == {"crc32": "uint32", "doc_offset": "uint32", "tokens": "ndarray:uint16:2048"} for c in columns
    )
    raw_bytes = sum(s["raw_data"]["bytes"] for s in index["shards"])
    stored_tokens = stats["splits"]["train"]["samples"] * 2048
    # 2 bytes per token plus 16 per sample (Streaming's offset, our doc_offset and CRC-32): 2.008 at L=2048.
    assert raw_bytes / stored_tokens <= 2.01


def test_bad_input_fails_without_output_and_skip_bad_lists_it(tmp_path: Path, tok_dir: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n{"text": "also fine"}\n')
    out = tmp_path / "mds"
    with pytest.raises(SourceError, match=r"d\.jsonl:2: malformed JSON"):
        convert_sources(out, tok_dir, [SourceSpec(path=str(path))])
    assert not out.exists() and not list(tmp_path.glob(".mds.*"))
    stats = convert_sources(out, tok_dir, [SourceSpec(path=str(path))], skip_bad=True)
    assert stats["skipped"]["count"] == 1
    assert stats["skipped"]["records"][0]["line"] == 2
    assert stats["splits"]["train"]["documents"] == 2


def test_interrupted_run_leaves_nothing_complete_and_rerun_is_exact(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = make_docs(200, seed=19)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "mds"
    original = convert_module._SplitWriter.add
    calls = {"n": 0}

    def crash_midway(self: object, tokens: np.ndarray, documents: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, tokens, documents)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module._SplitWriter, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        convert_sources(out, tok_dir, [SourceSpec(path=str(path))], batch_bytes=300)
    monkeypatch.undo()
    assert not out.exists()
    # A hard kill (no cleanup) leaves a temporary folder: it does not look complete and is removed.
    stale = tmp_path / ".mds.k1ll3d.tmp"
    (stale / "train").mkdir(parents=True)
    stats = convert_sources(out, tok_dir, [SourceSpec(path=str(path))], batch_bytes=300)
    assert not stale.exists()
    assert stats["splits"]["train"]["documents"] == len(docs)
    with pytest.raises(FileExistsError, match="already exists; remove it or pass --overwrite"):
        convert_sources(out, tok_dir, [SourceSpec(path=str(path))])
    again = convert_sources(out, tok_dir, [SourceSpec(path=str(path))], batch_bytes=300, overwrite=True)
    assert again.pop("seconds") > 0 and stats.pop("seconds") > 0  # the wall time, not written to stats.json
    assert again == stats == json.loads((out / "stats.json").read_text())
    tok = load_tokenizer(tok_dir)
    tokens = read_token_stream(single_stream_dataset(tmp_path, out, tok_dir), tok.token_to_id(PAD))
    assert tokens == reference_stream(tok_dir, docs)


def test_cli_writes_stats(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(50, seed=23)])
    out = tmp_path / "mds"
    convert_module.main(["--source", f"path={path}", "--tokenizer", str(tok_dir), "--out", str(out),
                         "--seq-len", "32", "--val-fraction", "0.1"])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    stats = json.loads((out / "stats.json").read_text())
    train, val = stats["splits"]["train"], stats["splits"]["val"]
    # One line by default (each split's counts and the throughput on lines of their own: --verbose).
    counts = (
        f"train {train['samples']:,} samples ({train['tokens']:,} tokens), "
        f"val {val['samples']:,} samples ({val['tokens']:,} tokens) of 33 tokens"
    )
    assert len(printed) == 1 and printed[0].startswith(f"wrote {out}: {counts}; "), printed
    assert printed[0].endswith(" tokens/s"), printed
    tokenizer = load_tokenizer(tok_dir)
    assert stats["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size()
    assert len(stats["tokenizer"]["fingerprint"]) == 64
    assert stats["splits"]["train"]["documents"] + stats["splits"]["val"]["documents"] == 50
