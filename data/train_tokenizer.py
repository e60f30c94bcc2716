"""Train the byte-level BPE tokenizer over a weighted mix of sources.

    python -m data.train_tokenizer --out runs/tok --vocab-size 65024 \\
        --source path=en.jsonl,weight=0.6 --source path=fr.jsonl,weight=0.3 \\
        --source path=code/,format=text,weight=0.1

Weights are shares of the training text in bytes (the paper: 60% English, 30% French, 10%
code). The mix uses as much text as it can without repeating any source: each source gives
``weight * total`` bytes, where ``total`` is capped by ``--max-bytes`` and by the smallest
source's size over its weight. One line reports the vocabulary and each source's bytes per token
(compression); ``--out/training_report.json`` (and ``--verbose``, as a table) adds the text trained
on and the tokens per whitespace-separated word (fertility).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers

from common import cli
from common.io import atomic_write_text, check_output_path
from data.sources import BadRecords, ChatDoc, Document, SourceSpec, chat_pieces, iter_documents, parse_source
from data.tokenizer import SPECIAL_TOKENS, encode_documents, save_tokenizer, train_tokenizer

_REPORT_BYTES = 2_000_000  # text per source measured for the report
# The largest vocabulary this tool trains: far above any LM's (Gemma: 262,144) and within what the
# tokenizers library allocates for (1e9 aborts the process), and what uint32 shards hold.
MAX_VOCAB = 1 << 20


@dataclass
class SourceSample:
    """The text a source contributes to tokenizer training."""

    spec: SourceSpec
    texts: list[str]
    bytes: int


def training_texts(doc: Document) -> Iterator[str]:
    """What BPE sees of a document: chat documents without their ChatML special tokens."""
    if isinstance(doc, ChatDoc):
        yield from (text for text, special in chat_pieces(doc.messages) if not special)
    else:
        yield doc


def _read_up_to(spec: SourceSpec, limit: int, bad: BadRecords) -> SourceSample:
    texts: list[str] = []
    size = 0
    for doc in iter_documents(spec, bad):
        for text in training_texts(doc):
            texts.append(text)
            size += len(text.encode("utf-8"))
        if size >= limit:
            break
    return SourceSample(spec, texts, size)


def _truncate(sample: SourceSample, limit: int) -> SourceSample:
    texts: list[str] = []
    size = 0
    for text in sample.texts:
        encoded = text.encode("utf-8")
        if size + len(encoded) > limit:
            # Cut the last text so that one huge document cannot upset the mix.
            texts.append(encoded[: limit - size].decode("utf-8", errors="ignore"))
            size = limit
            break
        texts.append(text)
        size += len(encoded)
    return SourceSample(sample.spec, texts, size)


def mix_sources(specs: Sequence[SourceSpec], max_bytes: int, bad: BadRecords) -> list[SourceSample]:
    """Read each source's share of a ``max_bytes`` budget, then trim all to the exact weights."""
    total_weight = sum(s.weight for s in specs)
    shares = [s.weight / total_weight for s in specs]
    samples = [_read_up_to(spec, int(max_bytes * share) + 1, bad) for spec, share in zip(specs, shares)]
    for sample in samples:
        if sample.bytes == 0:
            raise ValueError(f"source {sample.spec.name} ({sample.spec.path}) holds no text")
    total = min(max_bytes, *(sample.bytes / share for sample, share in zip(samples, shares)))
    return [_truncate(sample, int(total * share)) for sample, share in zip(samples, shares)]


def source_report(tok: Tokenizer, samples: Sequence[SourceSample]) -> list[dict[str, float | str | int]]:
    """Bytes per token and tokens per word of each source, on up to 2 MB of its text."""
    rows = []
    for sample in samples:
        texts = _truncate(sample, _REPORT_BYTES).texts
        ids = encode_documents(tok, texts)
        tokens = sum(len(i) for i in ids)
        size = sum(len(t.encode("utf-8")) for t in texts)
        words = sum(len(t.split()) for t in texts)
        rows.append(
            {
                "source": sample.spec.name,
                "train_bytes": sample.bytes,
                "bytes_per_token": size / max(tokens, 1),
                "tokens_per_word": tokens / max(words, 1),
            }
        )
    return rows


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser("python -m data.train_tokenizer", __doc__)
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        help="PATH or key=value,... (keys: path, format, name, text_field, messages_field, text_split, "
        "hf_split, weight: the source's share of the training text); repeat for each source",
    )
    parser.add_argument("--out", required=True, help="output folder (tokenizer.json + AutoTokenizer files)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=65024,
        help="tokens in the vocabulary, special tokens included (Mambaoutai: 65,024)",
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="a pair seen fewer times is never merged"
    )
    parser.add_argument(
        "--max-bytes", type=float, default=5e8, help="training text budget over all sources, in bytes"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records and list them (default: stop at the first, naming file and line)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="draw the tokenizers library's progress bars and print the per-source table "
        "(default: one summary line; the table is in --out/training_report.json)",
    )
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, before any text is read."""
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if not floor <= args.vocab_size <= MAX_VOCAB:
        raise cli.UserError(
            f"--vocab-size {args.vocab_size} must be between {floor} (256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens) and {MAX_VOCAB:,} (Mambaoutai: 65024)"
        )
    if args.min_frequency < 1:
        raise cli.UserError(f"--min-frequency {args.min_frequency} must be >= 1")
    if not args.max_bytes >= 1:
        raise cli.UserError(
            f"--max-bytes {args.max_bytes:g} leaves no text to train on: give a budget >= 1 byte (default 5e8)"
        )
    check_output_path(args.out, "--out", args.overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    specs = [parse_source(s) for s in args.source]
    _check_args(args)
    bad = BadRecords(skip=args.skip_bad)
    samples = mix_sources(specs, int(args.max_bytes), bad)
    tok = train_tokenizer(
        (t for s in samples for t in s.texts), args.vocab_size, args.min_frequency, show_progress=args.verbose
    )
    save_tokenizer(tok, args.out, overwrite=args.overwrite)
    rows = source_report(tok, samples)
    size = tok.get_vocab_size(with_added_tokens=True)
    if size < args.vocab_size:
        print(
            f"warning: the vocabulary has {size:,} tokens, not the {args.vocab_size:,} of --vocab-size: the text "
            f"({sum(s.bytes for s in samples):,} bytes) holds no more pairs seen --min-frequency "
            f"{args.min_frequency} times. Train on more text (--max-bytes, more sources) or ask for fewer tokens",
            file=sys.stderr,
        )
    if args.verbose:
        print(f"vocabulary: {size:,} tokens (asked {args.vocab_size:,})")
        print(f"{'source':<20} {'train MB':>9} {'bytes/token':>12} {'tokens/word':>12}")
        for row in rows:
            print(
                f"{row['source']:<20} {row['train_bytes'] / 1e6:>9.2f} "
                f"{row['bytes_per_token']:>12.3f} {row['tokens_per_word']:>12.3f}"
            )
    if bad.records:
        print(f"skipped {len(bad.records)} bad record(s):", file=sys.stderr)
        for record in bad.records[:20]:
            print(f"  {record['file']}:{record['line']}: {record['reason']}", file=sys.stderr)
    report = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "sources": rows,
        "skipped": bad.records,
    }
    atomic_write_text(Path(args.out) / "training_report.json", json.dumps(report, indent=2) + "\n")
    sources = ", ".join(f"{row['source']} {row['bytes_per_token']:.2f}" for row in rows)
    print(f"wrote {args.out}: {size:,} tokens; bytes/token {sources} (training_report.json)")


if __name__ == "__main__":
    cli.run(main)
