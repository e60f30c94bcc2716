"""The needle experiment's table and heatmaps over models and seeds (make needle-tiny).

    python -m eval.needle_table runs/needle/mamba-s1/needle runs/needle/attention-s1/needle --out runs/needle

Each argument is an ``eval.needle`` output folder (``trials.json``) of a run named ``<model>`` or
``<model>-s<seed>`` (the folder above it), e.g. ``runs/needle/mamba-s2/needle``. Runs of one model are
seeds: each cell of the table is the mean exact match over seeds, with the spread (standard deviation
over seeds; "-" for one seed), per context length as a multiple of the training length. The last
column is the wall time of the longest length's trials (prefill and decoding, all depths), mean over
seeds. Writes ``OUT/table.md`` (the table as printed) and ``OUT/heatmaps.png`` (depth x length per
model, mean over seeds, side by side).
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common import cli
from common.io import atomic_path, atomic_write_text, check_output_path

_SEED = re.compile(r"^(?P<model>.+)-s(?P<seed>\d+)$")


@dataclass
class Run:
    model: str
    seed: int | None
    record: dict


def read_run(folder: str | Path) -> Run:
    """The trials of one ``eval.needle`` output folder, with its model name and seed."""
    path = Path(folder) / "trials.json"
    if not path.is_file():
        raise cli.UserError(f"{path} does not exist: run eval.needle with --out {folder} first")
    record = json.loads(path.read_text())
    name = Path(folder).resolve().parent.name
    match = _SEED.match(name)
    return Run(match["model"], int(match["seed"]), record) if match else Run(name, None, record)


def by_length(record: dict) -> dict[int, float]:
    """Exact match per context length, over all depths and trials."""
    cells: dict[int, list[bool]] = {}
    for t in record["trials"]:
        cells.setdefault(t["length"], []).append(t["correct"])
    return {n: sum(v) / len(v) for n, v in sorted(cells.items())}


def length_seconds(record: dict, length: int) -> float:
    return sum(t.get("seconds", 0.0) for t in record["trials"] if t["length"] == length)


def mean_spread(values: Sequence[float]) -> str:
    spread = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "-"
    return f"{statistics.fmean(values):.2f} ± {spread}"


def group(runs: Sequence[Run]) -> dict[str, list[Run]]:
    models: dict[str, list[Run]] = {}
    for run in runs:
        models.setdefault(run.model, []).append(run)
    for model, seeds in models.items():
        lengths = {tuple(r.record["lengths"]) for r in seeds}
        if len(lengths) > 1:
            raise cli.UserError(f"the runs of {model} were asked at different --lengths: {sorted(lengths)}")
    return models


def table(runs: Sequence[Run]) -> str:
    """Markdown: one row per model, exact match (mean ± sd over seeds) per length, the longest length's
    wall time."""
    rows = []
    header: list[str] | None = None
    for model, seeds in group(runs).items():
        lengths = seeds[0].record["lengths"]
        train = seeds[0].record.get("train_length")
        names = [f"{n // train}x ({n})" if train and n % train == 0 else str(n) for n in lengths]
        this = ["model", "seeds", *names, f"{names[-1]} wall s"]
        if header is None:
            header = this
        elif header != this:
            raise cli.UserError(f"the runs of {model} were asked at other lengths than the first model's")
        scores = [by_length(r.record) for r in seeds]
        cells = [mean_spread([s[n] for s in scores]) for n in lengths]
        wall = statistics.fmean(length_seconds(r.record, lengths[-1]) for r in seeds)
        rows.append([model, str(len(seeds)), *cells, f"{wall:.1f}"])
    assert header is not None, "table() needs at least one run"
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + " |",
    ]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot_heatmaps(runs: Sequence[Run], out: str | Path) -> Path:
    """Depth x length exact match per model (mean over seeds), side by side, one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = group(runs)
    fig, axes = plt.subplots(1, len(models), figsize=(0.5 + 4.2 * len(models), 4.2), squeeze=False)
    image = None
    for ax, (model, seeds) in zip(axes[0], models.items(), strict=True):
        lengths, depths = seeds[0].record["lengths"], seeds[0].record["depths"]
        grid = [
            [statistics.fmean(r.record["accuracy"][i][j] for r in seeds) for j in range(len(lengths))]
            for i in range(len(depths))
        ]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        train = seeds[0].record.get("train_length")
        ax.set_xticks(range(len(lengths)), [f"{n // train}x" if train else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length" + (f" (x training length {train})" if train else " (tokens)"))
        ax.set_title(f"{model} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})", fontsize=10)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=list(axes[0]), label="exact match")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m eval.needle_table", __doc__)
    parser.add_argument(
        "folders", nargs="+", help="eval.needle output folders (runs/needle/<model>-s<seed>/needle)"
    )
    parser.add_argument("--out", required=True, help="folder for table.md and heatmaps.png")
    args = parser.parse_args(argv)
    check_output_path(args.out, "--out", overwrite=True)
    runs = [read_run(folder) for folder in args.folders]
    text = table(runs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "table.md", text)
    plot_heatmaps(runs, Path(args.out) / "heatmaps.png")
    print(text, end="")
    print(f"wrote {Path(args.out) / 'table.md'} and {Path(args.out) / 'heatmaps.png'}")


if __name__ == "__main__":
    cli.run(main)
