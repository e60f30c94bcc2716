"""Shared by the handover tests (init_from, export, Inheritune, object stores): a tiny corpus fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.sources import SourceSpec
from tests.data_helpers import (
    convert_sources,
    make_chats,
    make_docs,
    make_tokenizer,
    write_jsonl,
    write_mixture,
)


def build_corpus(root: Path) -> dict[str, Path]:
    """A 300-token tokenizer, a pre-training and a chat stream (seq 32), and a two-phase mixture
    (the same corpus as tests/test_train.py's fixture)."""
    tok = make_tokenizer(root / "tok", vocab_size=300)
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in make_docs(400, seed=1)])
    chats = write_jsonl(root / "chat.jsonl", [{"messages": m} for m in make_chats(60, seed=2)])
    convert_sources(root / "mds" / "docs", tok, [SourceSpec(path=str(docs))], val_fraction=0.1)
    convert_sources(
        root / "mds" / "chat", tok, [SourceSpec(path=str(chats), format="chat")], val_fraction=0.1
    )
    mixture = write_mixture(
        root / "mix.yaml",
        {
            "stable": {"docs": {"local": str(root / "mds" / "docs"), "proportion": 1.0}},
            "decay": {
                "docs": {"local": str(root / "mds" / "docs"), "repeat": 0.5},
                "chat": {"local": str(root / "mds" / "chat"), "repeat": 1.0},
            },
        },
    )
    return {"tokenizer": tok, "mixture": mixture, "root": root}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))
