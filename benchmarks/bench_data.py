"""Loader throughput per rank: the training StreamingDataset, read through its DataLoader.

Builds a synthetic corpus (random words from a fixed vocabulary of made-up words), trains a
small byte-level BPE tokenizer on it, converts it to MDS shards with ``data.convert`` at each
sequence length, then times the training loader of ``data.loader.build_dataloader`` (shuffled,
the ``stable`` phase of a one-stream mixture, a fresh local cache) with ``--workers`` DataLoader
workers: batches of ``--batch`` samples, tokens/s = input tokens served per second of wall
time after the first batch (worker start-up excluded).

Beside it: what one GPU consumes at the recipes' sizes. Mambaoutai (1.6B) trained at about
11,000 tokens/s per A100 (the paper); a 0.5B model is about 3x cheaper per
token, so about 33,000 tokens/s per GPU at the same MFU. ``headroom`` = loader / consumer: above
1, the loader is never the bottleneck.

    python benchmarks/bench_data.py                          # seq 4096 and 256, 2 workers

``checks us/sample``: what the loader's per-sample checks cost on their own (the CRC-32 written
by ``data.convert`` and the vocabulary range, ``data/loader.py``), timed on one stored sample of
each length; ``share`` is that time over the loader's time per sample (both included above).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cli
from common.io import atomic_write_text
from data.convert import ConvertConfig, convert, sample_checksum
from data.loader import DataConfig, build_dataloader
from data.sources import SourceSpec
from data.tokenizer import save_tokenizer, train_tokenizer

# tokens/s one GPU consumes: the paper's Mambaoutai 1.6B on an A100 (11,000), and the 0.5B
# ablation model at the same MFU (1.6B: 8.73 GFLOP/token per training step, 0.5B: about 2.9).
CONSUMERS = {"Mambaoutai 1.6B, one A100 (paper)": 11_000, "0.5B ablation, one A100 (same MFU)": 33_000}


def synthetic_docs(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3000)]
    return [" ".join(rng.choices(words, k=rng.randint(200, 2000))) + "." for _ in range(n_docs)]


def build_stream(tmp: Path, seq_len: int, docs: list[str], tokenizer: Path) -> Path:
    src = tmp / "corpus.jsonl"
    if not src.exists():
        atomic_write_text(src, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp / f"mds-{seq_len}"
    convert(
        ConvertConfig(
            sources=[SourceSpec(path=str(src))],
            tokenizer=str(tokenizer),
            out=str(out),
            seq_len=seq_len,
            workers=1,
        )
    )
    mixture = tmp / f"mix-{seq_len}.yaml"
    stream = {"remote": str(out), "local": str(tmp / f"cache-{seq_len}")}
    atomic_write_text(mixture, json.dumps({"phases": {"stable": {"streams": {"s": stream}}}}))
    return mixture


def measure(mixture: Path, tokenizer: Path, batch: int, workers: int, max_batches: int) -> tuple[float, int]:
    """(tokens/s after the first batch, batches read)."""
    spec = build_dataloader(DataConfig(mixture=str(mixture), num_workers=workers), tokenizer, batch)
    batches = iter(spec.dataloader)
    tokens, start, n = 0, None, 0
    for n, sample in enumerate(batches, start=1):
        if start is None:
            start = time.perf_counter()
            continue
        tokens += int(sample["input_ids"].numel())
        if n >= max_batches:
            break
    elapsed = time.perf_counter() - start if start else 0.0
    # Stop the workers now, before the next case (and before the cache folder is removed).
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    return (tokens / elapsed if elapsed > 0 else 0.0), n


def check_cost_us(seq_len: int, vocab: int = 2048, repeats: int = 2000) -> float:
    """Microseconds per sample of the loader's checks (CRC-32 of the stored sample, its largest id)."""
    tokens = np.random.default_rng(0).integers(0, vocab, size=seq_len + 1).astype(np.uint16)
    start = time.perf_counter()
    for _ in range(repeats):
        sample_checksum(tokens, 0)
        int(tokens.max())
    return (time.perf_counter() - start) / repeats * 1e6


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("python benchmarks/bench_data.py", __doc__)
    p.add_argument("--seqlens", nargs="+", type=int, default=[4096, 256], help="sample lengths")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--batch", type=int, default=8, help="samples per batch (one rank)")
    p.add_argument("--docs", type=int, default=3000, help="synthetic documents (about 1,100 words each)")
    p.add_argument("--max-batches", type=int, default=400, help="batches read per case (at most)")
    args = p.parse_args(argv)
    if min(args.seqlens) < 2 or args.workers < 0 or args.batch < 1 or args.docs < 10:
        raise cli.UserError("--seqlens >= 2, --workers >= 0, --batch >= 1, --docs >= 10")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# StreamingDataset training loader, one rank, {args.workers} workers, batch {args.batch}; load average {load}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_data_", ignore_cleanup_errors=True) as tmp_name:
        tmp = Path(tmp_name)
        docs = synthetic_docs(args.docs)
        tokenizer = tmp / "tokenizer"
        save_tokenizer(train_tokenizer(docs[:200], vocab_size=2048), tokenizer)
        print(
            f"{'seq':>6} {'tokens/s/rank':>14} {'batches':>8} {'checks us/sample':>17} {'share':>6}  "
            + "  ".join(f"headroom vs {k}" for k in CONSUMERS)
        )
        for seq_len in args.seqlens:
            mixture = build_stream(tmp, seq_len, docs, tokenizer)
            tok_s, n = measure(mixture, tokenizer, args.batch, args.workers, args.max_batches)
            checks = check_cost_us(seq_len)
            share = checks * 1e-6 / (seq_len / tok_s) if tok_s else float("nan")
            ratios = "  ".join(f"{tok_s / c:>{len('headroom vs ' + k)}.0f}x" for k, c in CONSUMERS.items())
            print(f"{seq_len:>6} {tok_s:>14,.0f} {n:>8} {checks:>17.1f} {share:>6.1%}  {ratios}", flush=True)
    print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    cli.run(main)
