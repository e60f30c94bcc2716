"""A multi-seed ablation's table: mean and spread across seeds, and the paper's directions.

    python -m eval.ablation runs/ablation-tiny --variants wsd cosine wsd-posweight --seeds 0 1 2

Reads ``ROOT/<variant>-s<seed>/evaluation.json`` (``recipes.evaluate`` of each run's final
checkpoint on the full validation split) and writes ``ROOT/ablation.md``: per variant the
validation cross-entropy, perplexity and top-k accuracy, overall and per position bucket, as
mean ± sample standard deviation over seeds; then whether each direction of the paper's
section 4.3 holds, from the paired per-seed differences (same seed = same data order):

- WSD ends below cosine in validation cross-entropy at equal tokens (after WSD's decay);
- positional weighting (``wsd-posweight``) raises top-3 and top-10 accuracy at the later
  positions (every bucket but the first) over plain WSD.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import cli
from common.io import atomic_write_text

METRICS = ("cross_entropy", "perplexity", "top1", "top3", "top10")


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return root / f"{variant}-s{seed}"


def load_evaluations(
    root: Path, variants: Sequence[str], seeds: Sequence[int]
) -> dict[str, list[dict[str, Any]]]:
    """{variant: [evaluation.json of each seed]}, refusing missing runs and unequal token counts."""
    out: dict[str, list[dict[str, Any]]] = {}
    for variant in variants:
        out[variant] = []
        for seed in seeds:
            path = run_dir(root, variant, seed) / "evaluation.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: train {run_dir(root, variant, seed)} and run python -m recipes.evaluate on it"
                )
            out[variant].append(json.loads(path.read_text()))
    tokens = {(v, s): e.get("tokens_trained") for v in variants for s, e in zip(seeds, out[v])}
    if len(set(tokens.values())) > 1:
        raise ValueError(f"the runs were evaluated at different token counts {tokens}: compare equal tokens")
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: Sequence[float | None], digits: int = 4) -> str:
    if any(v is None for v in values):
        return "-"
    mean, std = mean_std([float(v) for v in values])  # type: ignore[arg-type]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def direction(name: str, diffs: Sequence[float], want_negative: bool) -> dict[str, Any]:
    """A paired comparison: mean difference ± std, in how many seeds it has the wanted sign, and
    whether it holds: "yes" when every seed agrees, "no" when the mean goes the other way (or is
    zero), "mixed" when the mean agrees but some seed does not."""
    mean, std = mean_std(diffs)
    agree = sum((d < 0) if want_negative else (d > 0) for d in diffs)
    if agree == len(diffs):
        holds = "yes"
    elif (mean < 0) if want_negative else (mean > 0):
        holds = "mixed"
    else:
        holds = "no"
    return {"claim": name, "mean_diff": mean, "std_diff": std, "seeds_agreeing": agree, "seeds": len(diffs),
            "holds": holds}  # fmt: skip


def directions(evals: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The paper's two directions, where the needed variants are present."""
    found = []
    if "wsd" in evals and "cosine" in evals:
        diffs = [w["metrics"]["all"]["cross_entropy"] - c["metrics"]["all"]["cross_entropy"]
                 for w, c in zip(evals["wsd"], evals["cosine"])]  # fmt: skip
        found.append(direction("WSD val CE below cosine (wsd - cosine < 0)", diffs, want_negative=True))
    if "wsd" in evals and "wsd-posweight" in evals:
        buckets = evals["wsd"][0]["buckets"]
        for k in (3, 10):
            for bucket in buckets[1:]:
                pairs = list(zip(evals["wsd-posweight"], evals["wsd"]))
                if any(p["metrics"][bucket][f"top{k}"] is None for pair in pairs for p in pair):
                    continue  # a bucket the validation data never reaches
                diffs = [p["metrics"][bucket][f"top{k}"] - w["metrics"][bucket][f"top{k}"] for p, w in pairs]
                found.append(
                    direction(
                        f"weighting raises top-{k} at positions {bucket} (posweight - wsd > 0)", diffs, False
                    )
                )
    return found


def ablation_markdown(evals: dict[str, list[dict[str, Any]]], seeds: Sequence[int]) -> str:
    first = next(iter(evals.values()))[0]
    buckets = first["buckets"]
    lines = [
        f"Validation metrics after {first.get('tokens_trained')} tokens, mean ± std over seeds "
        f"{', '.join(map(str, seeds))} (every validation sample, unweighted).",
        "",
        "| variant | CE | perplexity | top-1 | top-3 | top-10 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, runs in evals.items():
        cells = [
            _cell([r["metrics"]["all"][m] for r in runs], 2 if m == "perplexity" else 4) for m in METRICS
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    for k in (3, 10):
        lines += ["", f"Top-{k} accuracy by position in the document:", ""]
        lines.append("| variant | " + " | ".join(buckets) + " |")
        lines.append("| --- |" + " ---: |" * len(buckets))
        for variant, runs in evals.items():
            cells = [_cell([r["metrics"][b][f"top{k}"] for r in runs]) for b in buckets]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    found = directions(evals)
    if found:
        lines += ["", "The paper's directions (paired by seed):", ""]
        lines.append("| claim | mean difference ± std | seeds agreeing | holds |")
        lines.append("| --- | ---: | ---: | --- |")
        for d in found:
            lines.append(f"| {d['claim']} | {d['mean_diff']:+.4f} ± {d['std_diff']:.4f} | "
                         f"{d['seeds_agreeing']}/{d['seeds']} | {d['holds']} |")  # fmt: skip
        lines += ["", "holds: yes = every seed agrees; mixed = the mean agrees, not every seed; "
                  "no = the mean goes the other way."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m eval.ablation", __doc__)
    parser.add_argument("root", help="folder holding the runs <variant>-s<seed>")
    parser.add_argument(
        "--variants", nargs="+", default=["wsd", "cosine", "wsd-posweight"], help="run variants"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--out", help="Markdown output (default: ROOT/ablation.md)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    evals = load_evaluations(root, args.variants, args.seeds)
    text = ablation_markdown(evals, args.seeds)
    out = Path(args.out) if args.out else root / "ablation.md"
    atomic_write_text(out, text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
