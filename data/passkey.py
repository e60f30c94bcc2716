"""Passkey documents: a number hidden in filler text, asked for at the end (training data for
the needle-in-a-haystack experiment).

    python -m data.passkey --haystack runs/demo/src/prose.jsonl --out runs/needle/src --count 6000
    python -m data.passkey --filler --max-number 999 --digits spaced --out runs/needle/src  # make needle-tiny

Each document is a window of filler text (consecutive words of the haystack source) with the
needle sentence at a random sentence boundary, then the question and its answer::

    ... filler. The pass key is 31415. Remember it. 31415 is the pass key. More filler ...
    What is the pass key? The pass key is 31415.

This is the passkey-retrieval format of Mohtashami & Jaggi (2023, "Landmark Attention"), with
the number drawn from 1 to 50000 as in the paper's needle test (section 5.1). ``eval.needle``
builds its prompts from the same ``NEEDLE`` and ``QUESTION``, so a model trained on these
documents is asked in the form it learnt, at lengths it never saw.

``--filler`` takes the haystack from the sentences of ``FILLER`` repeated (Mohtashami & Jaggi's
filler) instead of a source, and writes it to ``OUT/filler.txt`` for ``eval.needle``;
``--digits spaced`` writes the pass key one digit per word ("3 1 4 1 5"), which a BPE tokenizer
keeps as one stable token per digit; ``--max-number`` shortens it. ``make needle-tiny`` uses all
three, so that a tiny model learns the retrieval (README, "Needle in a haystack").
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import cli
from common.io import atomic_dir, check_output_path
from data.sources import BadRecords, document_text, iter_documents, parse_source

NEEDLE = "The pass key is {number}. Remember it. {number} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NUMBER_RANGE = (1, 50000)  # the paper: "a random number between 1 and 50000"
# A synthetic haystack: these sentences over and over, the filler of Mohtashami & Jaggi's passkey
# test. A tiny model learns it in a few batches, so what is left to learn is the retrieval itself.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DIGIT_STYLES = ("plain", "spaced")
_SENTENCE_END = re.compile(r"[.!?]$")


def number_text(number: int, digits: str = "plain") -> str:
    """How the pass key is written: "31415" (plain) or "3 1 4 1 5" (spaced: a BPE tokenizer then keeps
    every digit in a token of its own, the same tokens wherever the number appears)."""
    if digits not in DIGIT_STYLES:
        raise ValueError(f"digits={digits!r} is not one of {DIGIT_STYLES}")
    return " ".join(str(number)) if digits == "spaced" else str(number)


def parse_number(text: str, digits: str = "plain") -> int | None:
    """The first number written in ``text`` in the ``digits`` style (None when there is none):
    "31415." -> 31415 (plain), "3 1 4 1 5." -> 31415 (spaced)."""
    pattern = r"\d(?: \d)*" if digits == "spaced" else r"\d+"
    match = re.search(pattern, text)
    return int(match.group().replace(" ", "")) if match else None


def answer_text(number: int, digits: str = "plain") -> str:
    """What follows the question: " 31415." (the model is scored on the number alone)."""
    return f" {number_text(number, digits)}."


def filler_words(count: int) -> list[str]:
    """The first ``count`` words of ``FILLER`` repeated."""
    words = FILLER.split()
    return (words * (count // len(words) + 1))[:count]


def read_words(haystack: str, max_words: int) -> list[str]:
    """The first ``max_words`` whitespace-separated words of a source (any ``data.sources`` format)."""
    words: list[str] = []
    for doc in iter_documents(parse_source(haystack), BadRecords(flag=None)):
        words += document_text(doc).split()
        if len(words) >= max_words:
            break
    if len(words) < 100:
        raise ValueError(
            f"--haystack {haystack} holds {len(words)} words; passkey documents need at least 100"
        )
    return words[:max_words]


def passkey_document(
    words: Sequence[str],
    rng: random.Random,
    min_words: int,
    max_words: int,
    max_number: int = NUMBER_RANGE[1],
    digits: str = "plain",
) -> str:
    """One document: a random window of ``words``, the needle (a number from 1 to ``max_number``
    written in the ``digits`` style) at a sentence boundary, the question and its answer."""
    if not 0 < min_words <= max_words < len(words):
        raise ValueError(f"need 0 < min_words={min_words} <= max_words={max_words} < {len(words)} words")
    length = rng.randint(min_words, max_words)
    start = rng.randrange(len(words) - length)
    window = list(words[start : start + length])
    # Insert after a sentence end when the window has one (the needle then reads as a sentence).
    ends = [i + 1 for i, w in enumerate(window) if _SENTENCE_END.search(w)]
    where = rng.choice(ends) if ends else rng.randint(0, length)
    number = rng.randint(NUMBER_RANGE[0], max_number)
    body = " ".join([*window[:where], NEEDLE.format(number=number_text(number, digits)), *window[where:]])
    return f"{body}\n{QUESTION}{answer_text(number, digits)}"


def passkey_documents(
    words: Sequence[str],
    count: int,
    seed: int,
    min_words: int,
    max_words: int,
    max_number: int = NUMBER_RANGE[1],
    digits: str = "plain",
) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):
        yield passkey_document(words, rng, min_words, max_words, max_number, digits)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m data.passkey", __doc__)
    haystack = parser.add_mutually_exclusive_group(required=True)
    haystack.add_argument("--haystack", help="filler text: a data.sources path (.txt, .jsonl, ...)")
    haystack.add_argument(
        "--filler",
        action="store_true",
        help="the synthetic haystack (FILLER repeated); also written to OUT/filler.txt for eval.needle",
    )
    parser.add_argument("--out", required=True, help="output folder; gets passkey.jsonl")
    parser.add_argument(
        "--max-number", type=int, default=NUMBER_RANGE[1], help="pass keys are drawn from 1 to this"
    )
    parser.add_argument(
        "--digits", choices=DIGIT_STYLES, default="plain", help="plain (31415) or spaced (3 1 4 1 5)"
    )
    parser.add_argument("--count", type=int, default=6000, help="documents to write")
    parser.add_argument("--min-words", type=int, default=30, help="fewest filler words per document")
    parser.add_argument("--max-words", type=int, default=150, help="most filler words per document")
    parser.add_argument(
        "--haystack-words", type=int, default=200_000, help="words of --haystack to draw from"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (windows, positions, numbers)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    if args.count < 1:
        raise ValueError(f"--count {args.count} must be >= 1")
    if not 1 <= args.min_words <= args.max_words:
        raise ValueError(
            f"--min-words {args.min_words} and --max-words {args.max_words}: give 1 <= --min-words <= --max-words"
        )
    if args.max_number < NUMBER_RANGE[0]:
        raise ValueError(f"--max-number {args.max_number} must be >= {NUMBER_RANGE[0]}")
    check_output_path(args.out, "--out", args.overwrite)
    words = (
        filler_words(args.haystack_words) if args.filler else read_words(args.haystack, args.haystack_words)
    )
    documents = passkey_documents(
        words, args.count, args.seed, args.min_words, args.max_words, args.max_number, args.digits
    )
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        lines = [json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in documents]
        (tmp / "passkey.jsonl").write_text("".join(lines), encoding="utf-8")
        if args.filler:
            (tmp / "filler.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    print(f"{Path(args.out) / 'passkey.jsonl'}: {args.count} documents")


if __name__ == "__main__":
    cli.run(main)
