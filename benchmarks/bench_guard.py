"""What the non-finite guard costs: the demo model's training step with the guard on and off.

The demo's model (yamls/tiny: d_model 128, 4 layers, vocab 4096, fp32, CPU) trains in a real
Composer Trainer on random tokens (batch 8 of 256 tokens, 2 micro-batches, AdamW, gradient
clipping at 1.0 as the recipes do), the same seed every run. Runs alternate guard off / guard on,
so a change in the machine's load falls on both alike; each run times its steps between
``BATCH_START`` and ``BATCH_END`` (the first two are warm-up) and keeps the median, and the table
gives the median over runs. The guard's own time, measured inside the guarded runs around its
event handlers, is the second figure: it does not depend on the load of other jobs the way the
difference of two step times does. No checkpoint is written (the weight scan runs only before a
save, and a save costs far more than the scan).

    python benchmarks/bench_guard.py [--runs 5] [--steps 12]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Callback, Event, State
from composer.loggers import Logger
from torch.utils.data import DataLoader, Dataset

from callbacks.nonfinite_guard import NonFiniteGuard
from common import cli
from models.composer_model import ComposerMambaLM
from models.config import SSMConfig, preset

SEQ, BATCH, MICRO, WARMUP = 256, 8, 4, 2


class RandomTokens(Dataset):
    def __init__(self, vocab: int, n: int) -> None:
        self.tokens = torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class StepTimer(Callback):
    """Wall time of each batch, BATCH_START to BATCH_END."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        self.times.append(time.perf_counter() - self._start)


class TimedGuard(NonFiniteGuard):
    """The guard, with the time spent in its event handlers added up."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        start = time.perf_counter()
        super().run_event(event, state, logger)
        self.seconds += time.perf_counter() - start


def one_run(guard: bool, steps: int) -> tuple[float, float]:
    """(median step seconds, guard seconds per step) of one training run."""
    torch.manual_seed(0)
    cfg = preset("debug", d_model=128, n_layer=4, vocab_size=4096, ssm=SSMConfig(d_state=16))
    model = ComposerMambaLM(cfg)
    timer = StepTimer()
    guarded = TimedGuard() if guard else None
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(RandomTokens(cfg.vocab_size, BATCH * (steps + WARMUP)), batch_size=BATCH),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-4),
        max_duration=f"{steps + WARMUP}ba",
        device_train_microbatch_size=MICRO,
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=1.0)],
        callbacks=[timer, *([guarded] if guarded else [])],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )
    trainer.fit()
    trainer.close()
    step = statistics.median(timer.times[WARMUP:])
    return step, (guarded.seconds / len(timer.times) if guarded else 0.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python benchmarks/bench_guard.py", __doc__)
    parser.add_argument(
        "--runs", type=int, default=5, help="runs with the guard on, and as many off, alternating"
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run (after 2 warm-up steps)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    off, on, own = [], [], []
    for _ in range(args.runs):
        off.append(one_run(False, args.steps)[0])
        step, guard = one_run(True, args.steps)
        on.append(step)
        own.append(guard)
    off_s, on_s, own_s = statistics.median(off), statistics.median(on), statistics.median(own)
    print(
        f"demo model (d_model 128, 4 layers, vocab 4096), batch {BATCH} x {SEQ} in {BATCH // MICRO} micro-batches, "
        f"fp32, 1 thread; {args.runs} runs each (alternating), {args.steps} timed steps per run"
    )
    print("| guard | step time, median (ms) | overhead |")
    print("|---|---|---|")
    print(f"| off | {off_s * 1e3:.1f} | |")
    print(f"| on | {on_s * 1e3:.1f} | {100 * (on_s / off_s - 1):+.2f}% |")
    print(f"| the guard's own handlers, per step | {own_s * 1e3:.2f} | {100 * own_s / off_s:.2f}% |")
    print(f"per-run medians off (ms): {', '.join(f'{t * 1e3:.0f}' for t in off)}")
    print(f"per-run medians on (ms):  {', '.join(f'{t * 1e3:.0f}' for t in on)}")


if __name__ == "__main__":
    cli.run(main)
