"""Loss curves of one or more runs as a PNG (the paper's training-loss figures).

    python -m recipes.plot runs/wsd runs/cosine runs/wsd_posweight --out runs/ablation.png

Reads each run's ``metrics.jsonl``: the training loss against tokens seen (smoothed with an
exponential moving average), the unweighted training cross-entropy where positional
weighting made the loss differ, the evaluation cross-entropy, and the learning rate. A run
started from a checkpoint (a decay phase from a pre-decay checkpoint) restarts its clock at
0; it is drawn from the checkpoint's token count on, where it branches off its parent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from callbacks.jsonl_logger import read_jsonl
from common import cli
from common.io import atomic_path


def start_tokens(run: Path) -> float:
    """Tokens already trained by the checkpoint a run was started from (0 for a fresh run)."""
    info = run / "run.json"
    if not info.is_file():
        return 0.0
    load_path = json.loads(info.read_text())["config"]["checkpoint"].get("load_path")
    if not load_path or not Path(load_path).is_file():
        return 0.0
    # mmap: only the timestamp is read, not the weights.
    state = torch.load(load_path, map_location="cpu", weights_only=False, mmap=True)["state"]
    return float(state["timestamp"]["Timestamp"]["token"])


def series(records: list[dict], key: str, offset: float = 0.0) -> tuple[list[float], list[float]]:
    """(tokens, values) of ``key``, pairing each value with the latest ``time/token`` logged."""
    tokens, values, current = [], [], 0.0
    for rec in records:
        current = rec.get("time/token", current)
        if key in rec and isinstance(rec[key], (int, float)):
            tokens.append(float(current) + offset)
            values.append(float(rec[key]))
    return tokens, values


def ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_runs(run_dirs: list[Path], out: Path, smoothing: float = 0.1) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    for run in run_dirs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run} a training run directory?")
        records = read_jsonl(path)
        offset = start_tokens(run)
        tok, loss = series(records, "loss/train/total", offset)
        if not loss:
            raise ValueError(f"{path} has no 'loss/train/total' records yet")
        (line,) = ax_loss.plot(tok, ema(loss, smoothing), label=f"{run.name}: train loss")
        tok_ce, ce = series(records, "metrics/train/LanguageCrossEntropy", offset)
        if ce and any(abs(a - b) > 1e-6 for a, b in zip(ce, loss)):
            ax_loss.plot(
                tok_ce, ema(ce, smoothing), ls=":", color=line.get_color(), label=f"{run.name}: train CE"
            )
        tok_ev, ev = series(records, "metrics/eval/LanguageCrossEntropy", offset)
        if ev:
            ax_loss.plot(tok_ev, ev, "o--", color=line.get_color(), label=f"{run.name}: eval CE")
        tok_lr, lr = series(records, "lr-AdamW/group0", offset)
        ax_lr.plot(tok_lr, lr, color=line.get_color())
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m recipes.plot", __doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smoothing", type=float, default=0.1, help="EMA weight of the newest point")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(args.runs, args.out, args.smoothing)}")


if __name__ == "__main__":
    cli.run(main)
