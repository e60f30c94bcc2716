"""The paper's figures for a set of runs, as PNGs, and a Markdown summary.

    python -m eval.report runs/tiny/wsd runs/tiny/cosine runs/tiny/wsd-posweight --out runs/tiny/report

Reads each run's ``metrics.jsonl`` (and ``evaluation.json`` when ``recipes.evaluate`` wrote one)
and writes into ``--out``:

- ``train_loss.png``: the training cross-entropy against tokens, raw (faint) and smoothed
  (bold, a centred moving average); the unweighted cross-entropy, so runs with positional weighting compare with the
  others (their weighted loss is on another scale);
- ``decay.png``: the same, zoomed on the decay phase (from where the first WSD schedule leaves
  its peak learning rate; the last 20% of training when no run has a stable phase);
- ``val_perplexity.png``: validation perplexity at each evaluation;
- ``topk.png``: validation top-3 and top-10 accuracy at each evaluation, and, from
  ``evaluation.json``, per position bucket within documents;
- ``lr.png``: the learning-rate schedules;
- ``summary.md``: final numbers per run;
- ``findings.md``: each comparison the runs allow, as measured: the paired difference across
  seeds with its 95% Student t interval and verdict (``eval.ablation``, ``eval.stats``), the
  per-variant table, and links to the figures. Runs named ``<variant>-s<seed>`` (as
  ``make ablation-tiny`` names them) are seeds of one variant; the figures then show the first
  seed of each variant. Its tables, between ``<!-- tables -->`` markers, are what the README
  shows: ``--sync-readme README.md`` copies them into every README block
  ``<!-- findings: PATH/findings.md -->`` ... ``<!-- /findings -->``.

Every logged series is paired with tokens by its ``step`` (Composer logs the training
cross-entropy a second time at an epoch boundary: one point per step is kept, the first).
Each run gets its own colour and line style, so runs that nearly coincide stay visible; the
y-range of the loss figures covers the last ``--zoom`` fraction of training (default 70%).
A run started from a checkpoint (a decay from a pre-decay checkpoint, with
``checkpoint.load_path`` or ``init_from``) is drawn from the checkpoint's token count on, where
it branches off its parent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callbacks.jsonl_logger import read_jsonl
from common import cli
from common.io import atomic_path, atomic_write_text, check_output_path
from eval import ablation
from handover.reader import read_composer, tokens_trained

TOKENS = "time/token"
TRAIN_CE = "metrics/train/LanguageCrossEntropy"
TRAIN_LOSS = "loss/train/total"
EVAL_PPL = "metrics/eval/LanguagePerplexity"
EVAL_CE = "metrics/eval/LanguageCrossEntropy"
EVAL_TOPK = {k: f"metrics/eval/Top{k}Accuracy" for k in (1, 3, 10)}
LR = "lr-AdamW/group0"
LINESTYLES = ("-", "--", "-.", ":")
DEFAULT_SMOOTHING = 0.05  # the smoothing window, as a fraction of a run's logged points
DEFAULT_ZOOM = 0.7
DECAY_FALLBACK = 0.2  # the decay window when no run has a WSD stable phase: the last 20%


@dataclass
class Series:
    tokens: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One run's logged series (paired by step) and its final evaluation, if any."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    offset: float  # tokens trained before this run started (a checkpoint it was started from)
    evaluation: dict[str, Any] | None

    def series(self, key: str) -> Series:
        """``key`` against tokens, one point per logged step (the first value logged at a step)."""
        tokens_at: dict[int, float] = {}
        values_at: dict[int, float] = {}
        for rec in self.records:
            step = rec.get("step")
            if step is None:
                continue  # hyperparameter records
            if TOKENS in rec:
                tokens_at.setdefault(step, float(rec[TOKENS]))
            value = rec.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values_at.setdefault(step, float(value))
        out = Series()
        for step in sorted(values_at):
            if step in tokens_at:
                out.tokens.append(tokens_at[step] + self.offset)
                out.values.append(values_at[step])
        return out

    def train_ce(self) -> Series:
        ce = self.series(TRAIN_CE)
        return ce if ce.values else self.series(TRAIN_LOSS)


def start_tokens(run: Path, trust: bool = False) -> float:
    """Tokens already trained by the checkpoint a run was started from (0 for a fresh run).

    The run's ``run.json`` says, as planning found it: ``init_from_source`` (a run started with
    ``init_from`` from a release with its training state, or a Composer checkpoint) or
    ``load_path_source`` (a decay started with ``checkpoint.load_path``: the checkpoint's tokens,
    or 0 when the run kept the checkpoint's clock, since its logged tokens then count from there).
    A ``run.json`` written before planning recorded the latter names the checkpoint only: it is
    read, if still there, verified and memory-mapped (only its timestamp is read), as data unless
    ``trust`` (``--trust-checkpoint``): see handover/reader.py.
    """
    info = run / "run.json"
    if not info.is_file():
        return 0.0
    recorded = json.loads(info.read_text())
    seen = (recorded.get("init_from_source") or {}).get("tokens_seen")
    if seen is not None:
        return float(seen)
    source = recorded.get("load_path_source")
    if source is not None:
        return 0.0 if source["clock_kept"] else float(source["tokens_seen"])
    load_path = recorded["config"].get("checkpoint", {}).get("load_path")
    if not load_path or not Path(load_path).is_file():
        return 0.0
    state = read_composer(load_path, trust=trust, label=f"{info}: checkpoint.load_path={load_path}")
    return float(tokens_trained(state) or 0)


def run_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a folder name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def load_runs(paths: Sequence[str | Path], trust: bool = False) -> list[Run]:
    paths = [Path(p) for p in paths]
    if not paths:
        raise cli.UserError("no runs given: pass run folders (with metrics.jsonl)")
    runs = []
    for path, name in zip(paths, run_names(paths)):
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{metrics} not found: is {path} a training run folder?")
        evaluation = path / "evaluation.json"
        run = Run(
            name,
            path,
            read_jsonl(metrics),
            start_tokens(path, trust),
            json.loads(evaluation.read_text()) if evaluation.is_file() else None,
        )
        if not run.train_ce().values:
            raise ValueError(f"{metrics} has no training loss records yet")
        runs.append(run)
    return runs


def smooth(values: Sequence[float], fraction: float) -> list[float]:
    """Centred moving average over a window of ``fraction`` of the points (shrunk at the ends).

    Centred, unlike an exponential average, so the smoothed curve does not lag the raw one.
    """
    if not 0 <= fraction <= 1:
        raise cli.UserError(f"--smoothing {fraction} must be in [0, 1]: a fraction of the run's points")
    half = int(fraction * len(values)) // 2
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def style(index: int) -> dict[str, Any]:
    """A distinct colour and line style per run (tab10 colours x 4 line styles)."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return {"color": colors[index % len(colors)], "linestyle": LINESTYLES[index % len(LINESTYLES)]}


def decay_start(runs: Sequence[Run]) -> float:
    """Tokens where the first WSD decay begins: the learning rate leaves its plateau at the peak."""
    starts = []
    for run in runs:
        lr = run.series(LR)
        if len(lr.values) < 3:
            continue
        peak = max(lr.values)
        at_peak = [i for i, v in enumerate(lr.values) if math.isclose(v, peak, rel_tol=1e-6)]
        # A stable phase: the peak held for several logged steps, then a decrease.
        if len(at_peak) >= 3 and at_peak[-1] < len(lr.values) - 1:
            starts.append(lr.tokens[at_peak[-1]])
    if starts:
        return min(starts)
    end = max(run.train_ce().tokens[-1] for run in runs)
    begin = min(run.train_ce().tokens[0] for run in runs)
    return end - DECAY_FALLBACK * (end - begin)


def zoomed_ylim(curves: Sequence[Series], x_from: float) -> tuple[float, float] | None:
    """A y-range covering every curve's points at x >= x_from, with a 5% margin."""
    ys = [y for c in curves for x, y in zip(c.tokens, c.values) if x >= x_from and math.isfinite(y)]
    if not ys:
        return None
    low, high = min(ys), max(ys)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    return low - pad, high + pad


def _loss_axes(ax: Any, runs: Sequence[Run], smoothing: float, x_from: float, x_to: float | None) -> None:
    """Raw (faint) and smoothed (bold) training cross-entropy of every run; y-range from x_from on."""
    curves = []
    for i, run in enumerate(runs):
        ce = run.train_ce()
        smoothed = Series(ce.tokens, smooth(ce.values, smoothing))
        ax.plot(ce.tokens, ce.values, lw=0.8, alpha=0.25, label="_nolegend_", **style(i))
        ax.plot(smoothed.tokens, smoothed.values, lw=2.0, label=run.name, **style(i))
        curves += [ce, smoothed]
    ylim = zoomed_ylim(curves, x_from)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlim(left=x_from if x_to is not None else None, right=x_to)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _eval_axes(ax: Any, runs: Sequence[Run], key: str, ylabel: str) -> bool:
    drawn = False
    for i, run in enumerate(runs):
        s = run.series(key)
        if s.values:
            ax.plot(s.tokens, s.values, marker="o", ms=4, lw=1.5, label=run.name, **style(i))
            drawn = True
    ax.set_xlabel("tokens")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    return drawn


def _bucket_axes(ax: Any, runs: Sequence[Run], k: int) -> None:
    """Grouped bars: top-k accuracy per position bucket, one bar per run (from evaluation.json)."""
    evaluated = [(i, run) for i, run in enumerate(runs) if run.evaluation is not None]
    ax.set_title(f"top-{k} by position in document (final evaluation)", fontsize=9)
    if not evaluated:
        ax.text(0.5, 0.5, "no evaluation.json: run python -m recipes.evaluate RUN",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)  # fmt: skip
        return
    buckets = evaluated[0][1].evaluation["buckets"]
    width = 0.8 / len(evaluated)
    for slot, (i, run) in enumerate(evaluated):
        metrics = run.evaluation["metrics"]
        values = [metrics[b][f"top{k}"] if metrics.get(b, {}).get(f"top{k}") is not None else math.nan
                  for b in buckets]  # fmt: skip
        xs = [j + (slot - (len(evaluated) - 1) / 2) * width for j in range(len(buckets))]
        color = style(i)["color"]
        hatch = ["", "//", "..", "xx"][i % 4]
        ax.bar(xs, values, width=width, color=color, hatch=hatch, edgecolor="black", lw=0.4, label=run.name)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel("positions")
    ax.set_ylabel(f"top-{k} accuracy")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def build_figures(
    runs: Sequence[Run], smoothing: float = DEFAULT_SMOOTHING, zoom: float = DEFAULT_ZOOM
) -> dict[str, Any]:
    """{file name: matplotlib Figure} for the runs (nothing written)."""
    if not 0 < zoom <= 1:
        raise cli.UserError(f"--zoom {zoom} must be in (0, 1]: the fraction of training the y-range covers")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    begin = min(run.train_ce().tokens[0] for run in runs)
    end = max(run.train_ce().tokens[-1] for run in runs)
    figures: dict[str, Any] = {}

    fig, ax = plt.subplots(figsize=(9, 5))
    _loss_axes(ax, runs, smoothing, end - zoom * (end - begin), None)
    ax.set_title(f"training loss (y-range: last {zoom:.0%} of training)", fontsize=10)
    figures["train_loss.png"] = fig

    fig, ax = plt.subplots(figsize=(9, 5))
    start = decay_start(runs)
    _loss_axes(ax, runs, smoothing, start, end)
    ax.set_title("training loss during the decay phase", fontsize=10)
    figures["decay.png"] = fig

    fig, ax = plt.subplots(figsize=(9, 5))
    _eval_axes(ax, runs, EVAL_PPL, "validation perplexity")
    ax.set_title("validation perplexity", fontsize=10)
    figures["val_perplexity.png"] = fig

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, k in enumerate((3, 10)):
        _eval_axes(axes[0, col], runs, EVAL_TOPK[k], f"validation top-{k} accuracy")
        axes[0, col].set_title(f"top-{k} accuracy, all positions", fontsize=9)
        _bucket_axes(axes[1, col], runs, k)
    figures["topk.png"] = fig

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, run in enumerate(runs):
        lr = run.series(LR)
        ax.plot(lr.tokens, lr.values, lw=1.8, label=run.name, **style(i))
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedules", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures["lr.png"] = fig
    for fig in figures.values():
        fig.tight_layout()
    return figures


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_markdown(runs: Sequence[Run], smoothing: float = DEFAULT_SMOOTHING) -> str:
    """Final numbers per run: training CE, validation CE / perplexity / top-k, top-k by position."""
    lines = [
        "| run | tokens | train CE (smoothed) | val CE | val ppl | top-1 | top-3 | top-10 | source of val |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        ce = run.train_ce()
        final = smooth(ce.values, smoothing)[-1]
        if run.evaluation is not None:
            m = run.evaluation["metrics"]["all"]
            val = [m["cross_entropy"], m["perplexity"], m["top1"], m["top3"], m["top10"]]
            where = f"evaluation.json ({run.evaluation['samples']} samples)"
        else:
            last = [run.series(key).values[-1:] for key in (EVAL_CE, EVAL_PPL, *EVAL_TOPK.values())]
            val = [v[0] if v else None for v in last]
            where = "last eval in metrics.jsonl"
        lines.append(
            f"| {run.name} | {ce.tokens[-1]:.4g} | {final:.4f} | {_fmt(val[0])} | {_fmt(val[1], 2)} | "
            f"{_fmt(val[2])} | {_fmt(val[3])} | {_fmt(val[4])} | {where} |"
        )
    evaluated = [run for run in runs if run.evaluation is not None]
    if evaluated:
        buckets = evaluated[0].evaluation["buckets"]
        lines += ["", "Top-3 / top-10 accuracy by position in the document (final evaluation):", ""]
        lines.append("| run | " + " | ".join(buckets) + " |")
        lines.append("| --- |" + " ---: |" * len(buckets))
        for run in evaluated:
            m = run.evaluation["metrics"]
            cells = [f"{_fmt(m[b]['top3'])} / {_fmt(m[b]['top10'])}" for b in buckets]
            lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SEEDED = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
TABLES_BEGIN, TABLES_END = "<!-- tables -->", "<!-- /tables -->"
FIGURES = {
    "train_loss.png": "training loss",
    "decay.png": "training loss during the decay",
    "val_perplexity.png": "validation perplexity",
    "topk.png": "top-k accuracy, overall and by position",
    "lr.png": "learning-rate schedules",
}


def seed_groups(runs: Sequence[Run]) -> dict[str, dict[int, Run]]:
    """{variant: {seed: run}} from folder names ``<variant>-s<seed>``; another name is a variant of one seed."""
    groups: dict[str, dict[int, Run]] = {}
    for run in runs:
        match = SEEDED.match(run.path.name)
        variant, seed = (match["variant"], int(match["seed"])) if match else (run.name, 0)
        if seed in groups.setdefault(variant, {}):
            raise cli.UserError(
                f"{run.path} and {groups[variant][seed].path} are both seed {seed} of {variant}"
            )
        groups[variant][seed] = run
    return {v: dict(sorted(g.items())) for v, g in groups.items()}


def findings_markdown(runs: Sequence[Run]) -> str:
    """The findings page: what the runs show, each comparison with its interval and verdict."""
    groups = seed_groups(runs)
    lines = ["# Findings", ""]
    missing = [run.path for run in runs if run.evaluation is None]
    evaluated = {v: g for v, g in groups.items() if all(r.evaluation is not None for r in g.values())}
    seeds = sorted({s for g in evaluated.values() for s in g})
    paired = {v: g for v, g in evaluated.items() if sorted(g) == seeds}
    lines.append(
        "Runs: " + "; ".join(f"{v} (seeds {', '.join(map(str, g))})" for v, g in groups.items()) + "."
    )
    if missing:
        lines.append(
            "Not evaluated, left out: "
            + ", ".join(map(str, missing))
            + " (run python -m recipes.evaluate on them)."
        )
    unpaired = sorted(set(evaluated) - set(paired))
    if unpaired:
        lines.append(f"Left out of the comparisons (not every seed of {seeds}): {', '.join(unpaired)}.")
    lines.append("")
    lines.append(TABLES_BEGIN)
    if paired:
        evals = {v: [g[s].evaluation for s in seeds] for v, g in paired.items()}
        tokens = {(v, s): e.get("tokens_trained") for v, es in evals.items() for s, e in zip(seeds, es)}
        if len(set(tokens.values())) > 1:
            # A stable run and the decay started from its checkpoint (the demo), or runs of other
            # lengths: each is reported on its own, never compared (a difference would be the tokens').
            counts = ", ".join(f"{v} (seed {s}) {n:,}" for (v, s), n in tokens.items())
            lines.append(
                f"Not compared: the runs were evaluated after different token counts ({counts}); "
                "comparisons are made between runs evaluated at equal tokens (the variants of one ablation)."
            )
        else:
            lines.append(ablation.ablation_markdown(evals, seeds).rstrip("\n"))
    else:
        lines.append("No evaluated runs to compare: run python -m recipes.evaluate on each run.")
    lines += [TABLES_END, "", "Figures (the first seed of each variant):", ""]
    lines += [f"- [{title}]({name})" for name, title in FIGURES.items()]
    return "\n".join(lines) + "\n"


def findings_tables(text: str) -> str:
    """The tables of a findings page (between its ``<!-- tables -->`` markers)."""
    begin, end = text.find(TABLES_BEGIN), text.find(TABLES_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {TABLES_BEGIN} ... {TABLES_END} section: not a findings page of eval.report")
    return text[begin + len(TABLES_BEGIN) : end].strip("\n") + "\n"


README_BLOCK = re.compile(r"(<!-- findings: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /findings -->)", re.S)


def sync_readme(readme: Path) -> tuple[list[Path], list[str]]:
    """Copy each named findings page's tables into its README block.

    Returns the pages copied and the blocks left as they are because their page does not exist
    yet (the experiment has not run on this machine); refuses a README where none could be copied.
    """
    text = readme.read_text()
    copied: list[Path] = []
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        page = readme.parent / match["path"]
        if not page.is_file():
            missing.append(match["path"])
            return match.group(0)
        copied.append(page)
        return match.group(1) + findings_tables(page.read_text()) + match.group(4)

    new = README_BLOCK.sub(replace, text)
    if not copied:
        if not missing:
            raise cli.UserError(f"{readme} has no <!-- findings: PATH --> ... <!-- /findings --> block")
        raise cli.UserError(f"{readme}: none of the findings pages its blocks name exists ({', '.join(missing)}); "
                            "run the experiments (their make targets) first")  # fmt: skip
    atomic_write_text(readme, new)
    return copied, missing


def write_report(
    run_paths: Sequence[str | Path],
    out: str | Path,
    smoothing: float = DEFAULT_SMOOTHING,
    zoom: float = DEFAULT_ZOOM,
    trust: bool = False,
) -> list[Path]:
    """Write the PNGs, summary.md and findings.md into ``out``; returns the files written."""
    import matplotlib.pyplot as plt

    runs = load_runs(run_paths, trust)
    shown = [next(iter(g.values())) for g in seed_groups(runs).values()]
    out = Path(out)
    written = []
    for name, fig in build_figures(shown, smoothing, zoom).items():
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(out / name)
    atomic_write_text(out / "summary.md", summary_markdown(runs, smoothing))
    written.append(out / "summary.md")
    atomic_write_text(out / "findings.md", findings_markdown(runs))
    written.append(out / "findings.md")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m eval.report", __doc__)
    parser.add_argument("runs", nargs="*", help="run folders (with metrics.jsonl)")
    parser.add_argument("--out", help="output folder for the PNGs, summary.md and findings.md")
    parser.add_argument(
        "--smoothing",
        type=float,
        default=DEFAULT_SMOOTHING,
        help="smoothing window, as a fraction of each run's logged points",
    )
    parser.add_argument("--zoom", type=float, default=DEFAULT_ZOOM,
                        help="fraction of training, from its end, that sets the loss figures' y-range")  # fmt: skip
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read the checkpoints runs started from with full pickle (it can run code); only if you trust them",
    )
    parser.add_argument("--sync-readme", metavar="README",
                        help="copy the tables of each findings page a README block names into it (no runs needed)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sync_readme:
        copied, missing = sync_readme(Path(args.sync_readme))
        for page in copied:
            print(f"copied the tables of {page} into {args.sync_readme}")
        for path in missing:
            print(
                f"left the block of {path} as it is: that page does not exist (its experiment has not run here)"
            )
    if args.runs:
        if not args.out:
            parser.error("--out is required with run folders")
        check_output_path(args.out, "--out", overwrite=True)
        written = write_report(args.runs, args.out, args.smoothing, args.zoom, args.trust_checkpoint)
        print((Path(args.out) / "summary.md").read_text().split("\n\n", 1)[0])  # the final numbers per run
        print(f"wrote {args.out}: {', '.join(Path(path).name for path in written)}")
    elif not args.sync_readme:
        parser.error("give run folders (and --out), or --sync-readme README.md")


if __name__ == "__main__":
    cli.run(main)
