"""Needle-in-a-haystack, as the paper ran it (section 5.1).

    python -m eval.needle runs/needle/mamba --haystack runs/demo/src/prose.jsonl --out runs/needle/mamba-needle
    python -m eval.needle path/to/any-hf-causal-lm --haystack essays.txt --lengths 500,1000,2000,4096 --out out/

A number from 1 to 50000 (the needle sentence, ``data.passkey.NEEDLE``) is hidden at
``--depths`` evenly spaced depths (0% = the start of the context, 100% = just before the
question) in unrelated text (``--haystack``), for each context length of ``--lengths`` tokens
(the whole prompt, question included). The question (``data.passkey.QUESTION``) ends the
prompt; the model decodes greedily and scores 1 when the first number it writes equals the
needle (exact match).

Our models (run folder, checkpoint, HF Mamba or mamba_ssm folder) prefill the prompt once
through their recurrent state (linear in length for the SSM layers; only the last position's
logits are computed, so memory stays bounded at 16k tokens) and then decode one token at a
time. Any other local HF causal LM (``config.json`` of another ``model_type``) runs through its
own ``generate``, so a transformer can be put beside a Mamba.

Writes ``OUT/trials.json`` (every trial: length, depth, number, where the needle went, the
answer, whether it is correct; and the depth x length accuracy grid) and ``OUT/heatmap.png``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from common import cli
from common.io import atomic_path, atomic_write_text, check_output_path
from data.passkey import DIGIT_STYLES, NEEDLE, NUMBER_RANGE, QUESTION, number_text, parse_number
from data.sources import BadRecords, document_text, iter_documents, parse_source
from models.mamba_lm import MambaLMHeadModel

DEFAULT_LENGTHS = (500, 1000, 2000, 4096, 8192, 12288, 16384)  # the paper: 500 to 16384 tokens
DEFAULT_DEPTHS = 10  # the paper: the needle at 10 points of the context
MAX_NEW_TOKENS = 12  # a number up to 50000, with its leading space, in any tokenizer (spaced digits too)
SENTENCE_SEARCH = 64  # tokens to look back for a sentence end to put the needle after


class GreedyLM(Protocol):
    """What the harness needs from a model: greedy continuation of a prompt of token ids."""

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]: ...


class RecurrentGreedy:
    """Our ``MambaLMHeadModel``, decoding greedily with its own ``generate`` (recurrent: one prefill
    through the inference cache, then a step per token), stopping at the end-of-text token."""

    def __init__(
        self, model: MambaLMHeadModel, eos_token_id: int | None, vocab_size: int | None = None
    ) -> None:
        self.model = model.eval()
        self.eos = eos_token_id
        self.device = model.lm_head.weight.device
        self.vocab = vocab_size  # the tokenizer's: an HF export records the padded size (see generate)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=self.device)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        with autocast:
            out = self.model.generate(ids, max_new_tokens, eos_token_id=self.eos, vocab_size=self.vocab)
        new = out[0, len(prompt) :].tolist()
        return new[: new.index(self.eos) + 1] if self.eos in new else new


class HFGreedy:
    """Any HF transformers causal LM, decoding greedily with its own ``generate``."""

    def __init__(self, model: Any, eos_token_id: int | None) -> None:
        self.model = model.eval()
        self.eos = eos_token_id

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt], device=self.model.device)
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.eos if self.eos is not None else 0,
        )
        return out[0, len(prompt) :].tolist()


@dataclass
class Trial:
    length: int  # prompt tokens, question included
    depth: float  # where the needle was asked to go: 0 = start, 1 = just before the question
    number: int
    needle_start: int  # token index of the needle's first token in the prompt
    answer: str  # the decoded continuation
    correct: bool
    seconds: float = 0.0  # wall time of the prefill and the decoding


class Prompts:
    """Builds needle prompts of exact token lengths from a haystack, with one tokenizer."""

    def __init__(self, tokenizer: Any, haystack: list[int], digits: str = "plain") -> None:
        self.tok = tokenizer
        self.haystack = haystack
        self.digits = digits  # how the pass key is written (data.passkey.number_text)
        self.question = self.encode("\n" + QUESTION)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.prefix = [bos] if adds_bos else []  # e.g. Llama: prompts start with <s>, as in its training
        # Tokens that end a sentence: the needle goes right after one, as in Kamradt's test.
        self.sentence_ends = {
            i for i in set(haystack) if tokenizer.decode([i]).rstrip().endswith((".", "!", "?"))
        }

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def build(self, length: int, depth: float, number: int) -> tuple[list[int], int]:
        """(prompt ids of exactly ``length`` tokens, index of the needle's first token)."""
        needle = self.encode(" " + NEEDLE.format(number=number_text(number, self.digits)))
        budget = length - len(self.prefix) - len(needle) - len(self.question)
        if budget < 1:
            shortest = length - budget + 1
            raise cli.UserError(
                f"--lengths: a context of {length} tokens is shorter than the needle and question with this "
                f"tokenizer; use lengths >= {shortest}"
            )
        if budget > len(self.haystack):
            raise cli.UserError(
                f"the haystack has {len(self.haystack)} tokens, fewer than a {length}-token context needs"
            )
        hay = self.haystack[:budget]
        where = round(depth * budget)
        for back in range(min(SENTENCE_SEARCH, where)):
            if hay[where - back - 1] in self.sentence_ends:
                where -= back
                break
        prompt = self.prefix + hay[:where] + needle + hay[where:] + self.question
        return prompt, len(self.prefix) + where


def depth_grid(count: int) -> list[float]:
    """``count`` evenly spaced depths from 0 to 1 (10 -> 0, 0.111, ..., 1)."""
    if count < 1:
        raise cli.UserError(f"--depths {count} must be >= 1")
    return [0.5] if count == 1 else [i / (count - 1) for i in range(count)]


def run_needle(
    lm: GreedyLM,
    prompts: Prompts,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials_per_cell: int = 1,
    seed: int = 0,
    progress: bool = True,
    max_number: int = NUMBER_RANGE[1],
) -> list[Trial]:
    """Every (length, depth, trial) cell: build the prompt, decode greedily, score exact match of the
    first number the model writes (in the prompts' digit style) against the pass key."""
    rng = random.Random(seed)
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials_per_cell)]
    trials = []
    for length, depth, _ in tqdm(cells, desc="needle", unit="trial", disable=not progress):
        number = rng.randint(NUMBER_RANGE[0], max_number)
        prompt, needle_start = prompts.build(length, depth, number)
        start = time.perf_counter()
        answer = prompts.tok.decode(lm.greedy(prompt, MAX_NEW_TOKENS), skip_special_tokens=True)
        seconds = time.perf_counter() - start
        correct = parse_number(answer, prompts.digits) == number
        trials.append(Trial(length, depth, number, needle_start, answer, correct, seconds))
    return trials


def accuracy_grid(trials: Sequence[Trial]) -> tuple[list[float], list[int], list[list[float]]]:
    """(depths, lengths, grid[depth][length] = fraction of correct trials)."""
    depths = sorted({t.depth for t in trials})
    lengths = sorted({t.length for t in trials})
    grid = []
    for d in depths:
        row = []
        for n in lengths:
            cell = [t.correct for t in trials if t.depth == d and t.length == n]
            row.append(sum(cell) / len(cell))
        grid.append(row)
    return depths, lengths, grid


def plot_heatmap(
    trials: Sequence[Trial], out: str | Path, title: str, train_length: int | None = None
) -> Path:
    """Depth (rows) x context length (columns), green = found, red = missed, like the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths, lengths, grid = accuracy_grid(trials)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}".rstrip("0").rstrip(".") if value not in (0, 1) else f"{value:.0f}",
                    ha="center", va="center", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    if train_length is not None:
        # A dashed line between the last length within training and the first beyond it.
        inside = [j for j, n in enumerate(lengths) if n <= train_length]
        if inside and inside[-1] < len(lengths) - 1:
            ax.axvline(inside[-1] + 0.5, color="black", ls="--", lw=1.2)
            title += f"\n(dashed: training length {train_length})"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(out)


def haystack_tokens(tokenizer: Any, haystack: str, max_tokens: int) -> list[int]:
    """The haystack source's documents, tokenized and joined by blank lines, ``max_tokens`` long.

    A source shorter than that is read again from its start (the needle is still the only
    number-bearing "pass key" sentence in the context).
    """
    ids: list[int] = []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    while len(ids) < max_tokens:
        before = len(ids)
        for doc in iter_documents(parse_source(haystack), BadRecords(flag=None)):
            ids += tokenizer(document_text(doc), add_special_tokens=False)["input_ids"] + separator
            if len(ids) >= max_tokens:
                break
        if len(ids) == before:
            raise cli.UserError(f"--haystack {haystack} holds no text")
    return ids[:max_tokens]


def load_lm(
    source: str, checkpoint: str | None, tokenizer: str | None, device: torch.device
) -> tuple[GreedyLM, Any]:
    """(greedy LM, HF tokenizer) for our sources, or for any local HF causal LM folder."""
    from transformers import AutoTokenizer

    config = Path(source) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type is not None and model_type not in ("mamba", "mamba2"):
        from transformers import AutoModelForCausalLM

        tok = AutoTokenizer.from_pretrained(tokenizer or source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).to(device)
        return HFGreedy(hf_model, tok.eos_token_id), tok
    from eval.sources import load_source

    loaded = load_source(source, checkpoint)
    tokenizer = tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise cli.UserError(f"{source} holds no tokenizer: pass --tokenizer")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    return RecurrentGreedy(loaded.model.to(device), tok.eos_token_id, vocab_size=len(tok)), tok


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise cli.UserError(f"{flag} {text!r}: give comma-separated integers") from exc
    if not values or min(values) < 1:
        raise cli.UserError(f"{flag} {text!r}: give positive integers")
    return values


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m eval.needle", __doc__)
    parser.add_argument(
        "source", help="a run folder, a checkpoint, an HF / mamba_ssm folder, or any HF causal LM folder"
    )
    parser.add_argument(
        "--haystack", required=True, help="unrelated text: a data.sources path (.txt, .jsonl, ...)"
    )
    parser.add_argument("--out", required=True, help="output folder (trials.json, heatmap.png)")
    parser.add_argument(
        "--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="context lengths in tokens"
    )
    parser.add_argument(
        "--depths", type=int, default=DEFAULT_DEPTHS, help="needle depths, evenly spaced 0%%-100%%"
    )
    parser.add_argument("--trials", type=int, default=1, help="trials (numbers) per depth and length")
    parser.add_argument("--seed", type=int, default=0, help="seed of the needle numbers")
    parser.add_argument(
        "--max-number", type=int, default=NUMBER_RANGE[1], help="pass keys are drawn from 1 to this"
    )
    parser.add_argument(
        "--digits", choices=DIGIT_STYLES, default="plain", help="plain (31415) or spaced (3 1 4 1 5)"
    )
    parser.add_argument("--checkpoint", help="a checkpoint file of the run folder (default: its latest)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run's, or the model folder's)")
    parser.add_argument("--train-length", type=int, help="draw the training sequence length on the heatmap")
    parser.add_argument("--title", help="heatmap title (default: the source's name)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    lengths = parse_ints(args.lengths, "--lengths")
    check_output_path(args.out, "--out", overwrite=True)
    depths = depth_grid(args.depths)
    if args.trials < 1:
        raise cli.UserError(f"--trials {args.trials} must be >= 1")
    if args.max_number < NUMBER_RANGE[0]:
        raise cli.UserError(f"--max-number {args.max_number} must be >= {NUMBER_RANGE[0]}")
    lm, tok = load_lm(args.source, args.checkpoint, args.tokenizer, cli.resolve_device(args.device))
    prompts = Prompts(tok, haystack_tokens(tok, args.haystack, max(lengths)), args.digits)
    for length in (min(lengths), max(lengths)):  # what run_needle would meet later, said now
        prompts.build(length, 0.5, args.max_number)
    trials = run_needle(
        lm, prompts, lengths, depths, args.trials, args.seed, not args.no_progress, args.max_number
    )
    _, _, grid = accuracy_grid(trials)
    out = Path(args.out)
    record = {
        "source": args.source,
        "haystack": args.haystack,
        "needle": NEEDLE,
        "question": QUESTION,
        "digits": args.digits,
        "max_number": args.max_number,
        "train_length": args.train_length,
        "lengths": lengths,
        "depths": depths,
        "accuracy": grid,
        "overall": sum(t.correct for t in trials) / len(trials),
        "trials": [asdict(t) for t in trials],
    }
    atomic_write_text(out / "trials.json", json.dumps(record, indent=2) + "\n")
    title = args.title or f"needle in a haystack: {Path(args.source).name}"
    plot_heatmap(trials, out / "heatmap.png", title, args.train_length)
    print(f"exact match {record['overall']:.3f} over {len(trials)} trials; by length:")
    for j, n in enumerate(lengths):
        seconds = sum(t.seconds for t in trials if t.length == n)
        print(f"  {n:>6}: {sum(row[j] for row in grid) / len(grid):.2f}  ({seconds:.1f} s)")
    print(f"wrote {out / 'trials.json'} and {out / 'heatmap.png'}")


if __name__ == "__main__":
    cli.run(main)
