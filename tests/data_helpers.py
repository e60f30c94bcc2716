"""Shared helpers for the data tests: tiny corpora, a tiny tokenizer, conversion and read-back."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.io import atomic_write_text
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
    atomic_write_text(path, json.dumps({"phases": {p: {"streams": s} for p, s in phases.items()}}))
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


def dist_resume_worker(stream: str, tokenizer: str, work: str, batch_size: int = 4, k: int = 3) -> None:
    """Run under ``composer -n 2``: each rank saves its uninterrupted and its resumed batches.

    Ranks build the loader on one local cache (as on one node), take ``k + 2`` batches, then a
    second loader on a fresh cache loads the state Composer would save after ``k`` batches
    (``sample_in_epoch`` counts samples over all ranks) and takes 2 batches.
    """
    import os

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    work_dir = Path(work)

    def loader(cache: str) -> torch.utils.data.DataLoader:
        mixture = work_dir / f"{cache}.yaml"
        if rank == 0:
            write_mixture(mixture, {"stable": {"s": {"remote": stream, "local": str(work_dir / cache)}}})
        while not mixture.exists():
            import time

            time.sleep(0.05)
        from data.loader import build_dataloader

        return build_dataloader(DataConfig(mixture=str(mixture)), tokenizer, batch_size).dataloader

    full_loader = loader("full")
    full = []
    for batch in full_loader:
        full.append(batch)
        if len(full) == k + 2:
            break
    state = full_loader.dataset.state_dict(num_samples=k * batch_size * world, from_beginning=True)
    resumed_loader = loader("resumed")
    resumed_loader.dataset.load_state_dict(state)
    resumed = []
    for batch in resumed_loader:
        resumed.append(batch)
        if len(resumed) == 2:
            break
    torch.save({"full": full, "resumed": resumed, "state": state}, work_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    import sys

    dist_resume_worker(*sys.argv[1:4])
