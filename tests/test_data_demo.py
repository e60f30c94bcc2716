"""The demo pipeline: standard-library corpus -> tokenizer -> MDS streams -> both demo phases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data import convert, demo_corpus, train_tokenizer
from data.loader import DataConfig, build_dataloader
from data.shared_memory import clean_stale_shared_memory
from data.tokenizer import IM_START, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


@pytest.mark.slow  # about a minute on 2 cores: make test-e2e
def test_demo_corpus_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    for name in ("a", "b"):
        demo_corpus.main(
            ["--out", str(tmp_path / name), "--code-mb", "0.2", "--prose-mb", "0.1", "--chats", "20"]
        )
    for file in ("code.jsonl", "prose.jsonl", "chat.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    code = [json.loads(line)["text"] for line in (tmp_path / "a" / "code.jsonl").open()]
    assert any("def " in doc for doc in code)
    chats = [json.loads(line)["messages"] for line in (tmp_path / "a" / "chat.jsonl").open()]
    assert len(chats) == 20
    assert all(m["role"] in ("system", "user", "assistant") and m["content"] for c in chats for m in c)


@pytest.mark.slow  # about a minute on 2 cores: make test-e2e
def test_demo_pipeline_feeds_both_phases(tmp_path: Path) -> None:
    src, tok, mds = tmp_path / "src", tmp_path / "tokenizer", tmp_path / "mds"
    demo_corpus.main(["--out", str(src), "--code-mb", "0.3", "--prose-mb", "0.2", "--chats", "40"])
    train_tokenizer.main([
        "--out", str(tok), "--vocab-size", "600",
        "--source", f"path={src}/prose.jsonl,weight=0.6", "--source", f"path={src}/code.jsonl,weight=0.4",
    ])  # fmt: skip
    for name, spec in {"code": "", "prose": "", "chat": ",format=chat"}.items():
        convert.main([
            "--source", f"path={src}/{name}.jsonl{spec}", "--tokenizer", str(tok), "--out", str(mds / name),
            "--seq-len", "64", "--val-fraction", "0.05", "--workers", "2",
        ])  # fmt: skip
    im_start = load_tokenizer(tok).token_to_id(IM_START)
    seen_chat = False
    for phase in ("stable", "decay"):
        cfg = DataConfig(mixture=str(REPO / "yamls" / "data" / "demo.yaml"), phase=phase, root=str(mds))
        loader = build_dataloader(cfg, tok, device_batch_size=8).dataloader
        for batch in loader:
            assert batch["input_ids"].shape == (8, 64)
            seen_chat |= bool((batch["input_ids"] == im_start).any()) and phase == "decay"
            assert not ((batch["input_ids"] == im_start).any() and phase == "stable")
        del loader
    assert seen_chat
    val = build_dataloader(cfg, tok, device_batch_size=2, split="val").dataloader
    assert torch.is_tensor(next(iter(val))["position_ids"])
