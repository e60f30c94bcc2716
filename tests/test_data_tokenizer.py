"""Tokenizer: AutoTokenizer loading, exact round trips, single-token ChatML, training CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data import train_tokenizer as cli
from data.sources import BadRecords, SourceSpec, render_chatml
from data.tokenizer import (
    EOT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    build_trainer,
    encode_documents,
    fingerprint,
    load_tokenizer,
    token_dtype,
    vocabulary_size,
)
from tests.data_helpers import make_docs, make_tokenizer, write_jsonl

ROUND_TRIP = [
    "L'élève a déjà vu la forêt où le garçon naïf rêvait, cœur à l'été.",
    "def f(x):\n\tif x  ==  1:\n        return  {'a': [1, 2]}   \n\n\n    # trailing   ",
    "emoji 🐍 and CJK 漢字, NBSP\u00a0here, \r\nwindows line",
    "  leading spaces and a literal <|endoftext|> in text",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def test_autotokenizer_round_trips_exactly(tok_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    for text in ROUND_TRIP:
        ids = hf.encode(text, add_special_tokens=False)
        assert hf.decode(ids) == text
    assert hf.eos_token == EOT and hf.pad_token == PAD


def test_special_tokens_are_single_tokens_with_fixed_ids(tok_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert hf.encode(special, add_special_tokens=False) == [i]
    ids = hf.encode(f"{IM_START}user\nhi{IM_END}\n", add_special_tokens=False)
    assert ids[0] == hf.convert_tokens_to_ids(IM_START)
    assert hf.convert_tokens_to_ids(IM_END) in ids


def test_chat_template_matches_converter_rendering(tok_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    messages = [{"role": "system", "content": "Sois bref."}, {"role": "user", "content": "Où ?"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert rendered == render_chatml(tuple((m["role"], m["content"]) for m in messages))
    assert rendered == f"{IM_START}system\nSois bref.{IM_END}\n{IM_START}user\nOù ?{IM_END}\n"


def test_document_text_never_yields_end_of_text_id(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    [ids] = encode_documents(tok, [f"before {EOT} after {IM_START}"])
    assert tok.token_to_id(EOT) not in ids and tok.token_to_id(IM_START) not in ids
    assert tok.decode(ids, skip_special_tokens=False) == f"before {EOT} after {IM_START}"


def test_fingerprint_survives_save_and_load(tok_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tok_dir)
    again = make_tokenizer(tmp_path / "again")
    assert fingerprint(load_tokenizer(again)) == fingerprint(tok)
    other = make_tokenizer(tmp_path / "other", vocab_size=350)
    assert fingerprint(load_tokenizer(other)) != fingerprint(tok)


def test_vocabulary_size_counts_what_transformers_counts(tok_dir: Path) -> None:
    """The one reading of a vocabulary: transformers' len() of the saved folder, added tokens included."""
    expected = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    assert vocabulary_size(tok_dir) == vocabulary_size(load_tokenizer(tok_dir)) == expected
    assert load_tokenizer(tok_dir).get_vocab_size(with_added_tokens=False) <= expected


def test_vocab_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*at least 260"):
        build_trainer(100)


def test_token_dtype_fits_vocabulary() -> None:
    assert token_dtype(65_536) == "uint16"
    assert token_dtype(65_537) == "uint32"


def test_mix_follows_weights(tmp_path: Path) -> None:
    en_docs = make_docs(300, seed=1)
    en = write_jsonl(tmp_path / "en.jsonl", [{"text": d} for d in en_docs])
    fr = write_jsonl(tmp_path / "fr.jsonl", [{"text": d} for d in make_docs(300, seed=2)])
    specs = [SourceSpec(path=str(en), weight=0.75), SourceSpec(path=str(fr), weight=0.25)]
    samples = cli.mix_sources(specs, max_bytes=10**9, bad=BadRecords())
    total = sum(s.bytes for s in samples)
    assert samples[0].bytes / total == pytest.approx(0.75, abs=0.01)
    # No source is repeated: the larger share is the whole of its source.
    assert samples[0].bytes == sum(len(d.encode()) for d in en_docs)


def test_cli_trains_saves_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    en = write_jsonl(tmp_path / "en.jsonl", [{"text": d} for d in make_docs(200, seed=1)])
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def f(x):\n    return x\n" * 40)
    out = tmp_path / "tok"
    cli.main(["--source", f"path={en},weight=0.6", "--source", f"path={code},format=text,weight=0.4",
              "--vocab-size", "320", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    report = json.loads((out / "training_report.json").read_text())
    # One summary line by default; the per-source table only with --verbose (and in the report).
    shares = ", ".join(f"{r['source']} {r['bytes_per_token']:.2f}" for r in report["sources"])
    assert printed == [f"wrote {out}: 320 tokens; bytes/token {shares} (training_report.json)"]
    cli.main(["--source", f"path={en}", "--vocab-size", "300", "--out", str(tmp_path / "v"), "--verbose"])
    verbose = capsys.readouterr().out
    assert "vocabulary: 300 tokens (asked 300)" in verbose and "tokens/word" in verbose
    assert [r["source"] for r in report["sources"]] == ["en", "code"]
    assert all(r["bytes_per_token"] >= 1.0 for r in report["sources"])
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(hf) == 320
