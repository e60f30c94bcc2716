"""Conversion throughput (MB/s of text, tokens/s) beside the tokenizer's own ceiling.

    python benchmarks/bench_convert.py [--corpora DIR] [--tokenizer DIR] [--code-mb 8]

Corpora: the ``*.txt`` texts in ``--corpora`` if given (cut into documents of 20 lines; e.g. any
English and French prose), and the Python standard library's sources (one document per file). The ceiling is plain
``tokenizers`` ``encode_batch`` over the same documents in one call (all cores, no I/O); the
one-document-at-a-time lines are ``encode`` per document and, as llm-foundry's
``ConcatTokensDataset`` does, the transformers tokenizer called on each document. Conversion
(``data.convert``: read JSON Lines, tokenize in worker processes, pack, write zstd MDS) runs
with 1 and 2 workers. Without ``--tokenizer`` a 32k byte-level BPE is trained on the text.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data.convert import ConvertConfig, convert
from data.demo_corpus import stdlib_files
from data.sources import SourceSpec
from data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def corpus_documents(corpora: Path | None, code_mb: float) -> dict[str, list[str]]:
    docs: dict[str, list[str]] = {}
    for path in sorted(corpora.glob("*.txt")) if corpora is not None else []:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        docs[path.stem] = ["".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
    code, size = [], 0
    for path in stdlib_files():
        if size >= code_mb * 1e6:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        code.append(text)
        size += len(text.encode())
    docs["python_stdlib"] = code
    return docs


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object], repeat: int = 2) -> tuple[float, float]:
    """Best (wall, CPU) seconds of ``repeat`` runs; the first run also warms caches and threads.

    CPU seconds measure the work done whatever else the machine runs; wall seconds are what a
    user waits on an otherwise idle machine.
    """
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        best = min(best, (time.perf_counter() - wall, _cpu_seconds() - cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpora",
        type=Path,
        default=None,
        help="a folder of *.txt prose to add to the standard library's sources",
    )
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--code-mb", type=float, default=8.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    docs = corpus_documents(args.corpora, args.code_mb)
    texts = [d for group in docs.values() for d in group]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        f"corpus: {len(texts):,} documents, {mb:.1f} MB ({', '.join(f'{k}: {len(v)}' for k, v in docs.items())})"
    )

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = tmp / "tokenizer"
            start = time.perf_counter()
            save_tokenizer(train_tokenizer(texts, args.vocab_size), tok_dir)
            print(f"trained a {args.vocab_size}-token BPE in {time.perf_counter() - start:.1f} s")
        tok = load_tokenizer(tok_dir)
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))

        source = tmp / "corpus.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")

        rows = []
        seconds = timed(lambda: tok.encode_batch(texts, add_special_tokens=False))
        rows.append(("ceiling: encode_batch, one call", seconds))
        seconds = timed(lambda: tok.encode_batch_fast(texts, add_special_tokens=False))
        rows.append(("encode_batch_fast, one call", seconds))
        subset = texts[: max(1, len(texts) // 4)]
        share = sum(len(t.encode()) for t in subset) / 1e6 / mb
        wall, cpu = timed(lambda: [tok.encode(t, add_special_tokens=False) for t in subset], repeat=1)
        rows.append(("tokenizers encode, one doc at a time", (wall / share, cpu / share)))
        # Imported here: spawned tokenizer workers re-import this script and must stay light.
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        wall, cpu = timed(
            lambda: [hf_tok(t, truncation=False, padding=False)["input_ids"] for t in subset], repeat=1
        )
        rows.append(("llm-foundry style (HF __call__ per doc)", (wall / share, cpu / share)))

        raw_bytes = stored = 0
        for workers in (1, 2):
            out = tmp / f"mds{workers}"

            def run(out: Path = out, workers: int = workers) -> None:
                cfg = ConvertConfig(
                    sources=[SourceSpec(path=str(source))],
                    tokenizer=str(tok_dir),
                    out=str(out),
                    seq_len=args.seq_len,
                    workers=workers,
                    val_fraction=0.0,
                    overwrite=True,
                )
                convert(cfg)

            rows.append((f"data.convert, {workers} worker(s)", timed(run)))
            index = json.loads((out / "train" / "index.json").read_text())
            raw_bytes = sum(s["raw_data"]["bytes"] for s in index["shards"])
            zipped = sum(s["zip_data"]["bytes"] for s in index["shards"])
            stored = sum(s["samples"] for s in index["shards"]) * (args.seq_len + 1)

        ceiling_wall, ceiling_cpu = rows[0][1]
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (wall-clock figures need an idle machine)"
        )
        print(f"{'':<40} {'MB/s':>7} {'Mtok/s':>7} {'of ceiling':>10} {'CPU s/MB':>9} {'of ceiling':>10}")
        for name, (wall, cpu) in rows:
            print(
                f"{name:<40} {mb / wall:>7.2f} {tokens / wall / 1e6:>7.3f} {ceiling_wall / wall:>10.0%} "
                f"{cpu / mb:>9.3f} {ceiling_cpu / cpu:>10.0%}"
            )
        print(
            f"stored: {raw_bytes / stored:.3f} bytes/token before compression, {zipped / stored:.3f} after zstd "
            f"({index['shards'][0]['column_encodings'][1]})"
        )


if __name__ == "__main__":
    main()
