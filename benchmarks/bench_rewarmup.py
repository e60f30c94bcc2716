"""AdamW without moments: the first steps of a decay started from a pre-decay checkpoint.

    python benchmarks/bench_rewarmup.py   # after `make demo-data`; 270 tiny batches (40 minutes here at load 30)

Trains the tiny WSD recipe on the demo corpus (yamls/tiny/wsd.yaml, pre-decay checkpoint at
batch 120), then runs its 40-batch decay (yamls/tiny/decay.yaml) four ways from that checkpoint:
with the checkpoint's AdamW state (``checkpoint.load_path``), from its HF release with its
training state (``recipes.export --with-training-state``, then ``init_from``: the moments
restored), and from its weights alone (``init_from``: fresh moments) with and without the lr
re-warmup. Prints, for each, the loss on
one fixed validation batch before training and after each of the first steps (the same batch
for every run, so the numbers compare without data noise), and the mean training loss of the
decay's last 10 batches, then the gap table: each way's last-10 loss minus the checkpoint's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.jsonl_logger import read_jsonl
from data.loader import build_dataloader
from handover.export import export
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run

ROOT = Path(__file__).resolve().parents[1]


class FixedBatchLoss(Callback):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch, self.losses = batch, []

    def _probe(self, state: State) -> None:
        with torch.no_grad():
            self.losses.append(float(state.model.loss(state.model(self.batch), self.batch)))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._probe(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._probe(state)


def fit(recipe: str, overrides: list[str], probe: Callback | None = None) -> Path:
    cfg = load_train_config([ROOT / recipe], overrides)
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=[probe] if probe else None)
    trainer.fit()
    trainer.close()
    return cfg.run_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/bench-rewarmup", help="run root")
    parser.add_argument("--steps", type=int, default=10, help="first steps to print")
    parser.add_argument("--rewarmup", default="20ba", help="init_from.lr_rewarmup of the remedy run")
    args = parser.parse_args()
    common = [f"run_root={args.out}", "logging.progress_bar=false", "eval_interval=null"]
    stable = Path(args.out) / "stable"
    if not list((stable / "checkpoints").glob("pre-decay-*.pt")):
        fit("yamls/tiny/wsd.yaml", [*common, "run_name=stable", "checkpoint.save_interval=1000ba"])
    pre_decay = sorted((stable / "checkpoints").glob("pre-decay-*.pt"))[0]
    cfg = load_train_config([ROOT / "yamls/tiny/decay.yaml"], common)
    batch = next(iter(build_dataloader(cfg.data, cfg.tokenizer, 16, split="val").dataloader))
    release = Path(args.out) / "release"
    if not (release / "training_state.json").is_file():
        export(str(pre_decay), "hf", str(release), overwrite=True, with_training_state=True)
    runs = {
        "AdamW state (checkpoint.load_path)": [f"checkpoint.load_path={pre_decay}"],
        "release with training state (init_from)": [f"init_from.path={release}"],
        "fresh moments, no re-warmup": [f"init_from.path={pre_decay}", "init_from.lr_rewarmup=0ba"],
        f"fresh moments, lr_rewarmup={args.rewarmup}": [
            f"init_from.path={pre_decay}",
            f"init_from.lr_rewarmup={args.rewarmup}",
        ],
    }
    rows = []
    for i, (name, extra) in enumerate(runs.items()):
        probe = FixedBatchLoss(batch)
        run_dir = fit("yamls/tiny/decay.yaml", [*common, f"run_name=decay{i}", *extra], probe)
        train = [
            r["loss/train/total"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss/train/total" in r
        ]
        rows.append((name, probe.losses[: args.steps + 1], sum(train[-10:]) / 10))
    print(f"\npre-decay checkpoint {pre_decay}; load average {os.getloadavg()[0]:.1f}")
    print(f"fixed validation batch loss: before training, then after steps 1..{args.steps}\n")
    print(
        "| run | " + " | ".join(str(k) for k in range(args.steps + 1)) + " | max rise | last-10 train loss |"
    )
    print("|---" * (args.steps + 4) + "|")
    for name, losses, last in rows:
        rise = max(losses[1:]) - losses[0]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in losses) + f" | {rise:+.3f} | {last:.3f} |")
    print(
        "\n| decay started from | last-10 train loss | gap to the checkpoint's AdamW state |\n|---|---|---|"
    )
    for name, _, last in rows:
        print(f"| {name} | {last:.4f} | {last - rows[0][2]:+.4f} |")


if __name__ == "__main__":
    main()
