"""Shared helpers for the data tests: tiny corpora, a tiny tokenizer, conversion and read-back."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.convert import ConvertConfig, convert
from data.loader import DataConfig, PackedTokenDataset, build_dataset
from data.sources import SourceSpec
from data.tokenizer import save_tokenizer, train_tokenizer

_EN = [
    "the",
    "a",
    "of",
    "river",
    "light",
    "morning",
    "city",
    "learns",
    "quietly",
    "builds",
    "strong",
    "code",
    "data",
    "model",
    "token",
]
_FR = [
    "le",
    "la",
    "les",
    "été",
    "élève",
    "où",
    "déjà",
    "français",
    "cœur",
    "naïve",
    "forêt",
    "château",
    "fenêtre",
    "garçon",
]
_CODE = [
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tprint(i)  # tab\n",
    "class A:\n    def __init__(self):\n        self.x = {'k': [1, 2]}\n",
    "if a  ==  b:\n        pass\n\n\n",
]


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """Deterministic documents mixing English, French accents and code whitespace."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            docs.append(" ".join(rng.choice(_EN) for _ in range(rng.randint(min_words, max_words))) + ".")
        elif kind == 1:
            docs.append(" ".join(rng.choice(_FR) for _ in range(rng.randint(min_words, max_words))) + " !")
        else:
            docs.append("".join(rng.choice(_CODE) for _ in range(rng.randint(1, 4))))
    return docs


def make_chats(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": "user", "content": " ".join(rng.choice(_EN) for _ in range(6)) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(_FR) for _ in range(9))})
        chats.append(messages)
    return chats


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tokenizer(out: Path, vocab_size: int = 400) -> Path:
    texts = make_docs(300, seed=123) + [m["content"] for c in make_chats(30, seed=5) for m in c]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    save_tokenizer(tok, out)
    return out


def convert_sources(
    out: Path,
    tokenizer: Path,
    sources: Sequence[SourceSpec],
    seq_len: int = 32,
    workers: int = 1,
    val_fraction: float = 0.0,
    batch_bytes: int = 2000,
    **kwargs: object,
) -> dict:
    cfg = ConvertConfig(
        sources=list(sources),
        tokenizer=str(tokenizer),
        out=str(out),
        seq_len=seq_len,
        workers=workers,
        val_fraction=val_fraction,
        batch_bytes=batch_bytes,
        **kwargs,  # type: ignore[arg-type]
    )
    return convert(cfg)


def write_mixture(path: Path, phases: dict[str, dict[str, dict]]) -> Path:
    """A mixture YAML (JSON is YAML) from {phase: {stream: {local: ..., proportion: ...}}}."""
    path.write_text(json.dumps({"phases": {p: {"streams": s} for p, s in phases.items()}}))
    return path


def single_stream_dataset(
    tmp: Path, stream_dir: Path, tokenizer: Path, split: str = "train", batch_size: int = 4, **cfg: object
) -> PackedTokenDataset:
    """An unshuffled dataset over one converted stream, read through a fresh local cache."""
    mixture = write_mixture(
        tmp / f"mix_{split}.yaml",
        {"stable": {"s": {"remote": str(stream_dir), "local": str(tmp / f"cache_{split}")}}},
    )
    config = DataConfig(mixture=str(mixture), shuffle=False, **cfg)  # type: ignore[arg-type]
    return build_dataset(config, tokenizer, batch_size, split)


def read_token_stream(dataset: PackedTokenDataset, pad_id: int) -> list[int]:
    """All stored tokens in sample order (input_ids + the last label), trailing padding removed."""
    tokens: list[int] = []
    for example in dataset:
        last = example["labels"][-1:]
        sample = torch.cat([example["input_ids"], last]).tolist()
        tokens.extend(sample)
    while tokens and tokens[-1] in (pad_id, -100):
        tokens.pop()
    return tokens


def expected_positions(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Reference positions over a whole token stream: count up, restart after each end-of-text."""
    positions = np.zeros(len(tokens), dtype=np.int64)
    pos = 0
    for i, t in enumerate(tokens.tolist()):
        positions[i] = pos
        pos = 0 if t == eot_id else pos + 1
    return positions
