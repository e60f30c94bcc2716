"""The learning rate of the first batch after a checkpoint load is the recipe's, not the checkpoint's.

Loading a checkpoint restores the optimizer's parameter groups, their ``lr`` included, and, unless
``state/schedulers`` is ignored, the schedule's base learning rates. Two silent faults follow:

* a decay phase started from a pre-decay checkpoint with a new peak (``optimizer.lr``) trains its
  first batch at the checkpoint's lr, then jumps to the new schedule;
* a run resumed whole with a changed ``optimizer.lr`` keeps scaling the checkpoint's peak forever.

At fit start (after Composer's load) this callback sets each schedule's base lr to the recipe's
peak, with a warning naming both values when they differ, and each group's ``lr`` to the value its
next batch must train with. Composer steps the schedule after a batch and before it advances the
clock (batch ``n`` trains with ``f(n - 1)``), so:

* on a fresh clock (a decay phase, whose timestamp was not loaded) that value is ``peak * f(0)``,
  the schedule's first value;
* on a resumed clock the loaded ``lr`` already is ``old peak * f(t - 1)``: it is rescaled by
  ``peak / old peak`` (unchanged when the peak is), never recomputed at ``t``, which would run
  the schedule one step ahead of an uninterrupted run.
"""

from __future__ import annotations

import logging

from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)


class ScheduledLrAfterLoad(Callback):
    """Re-apply the recipe's peak lr and the schedule's current value after a checkpoint load.

    Args:
        peak_lr: The recipe's peak learning rate (``optimizer.lr``), for every parameter group.
    """

    def __init__(self, peak_lr: float) -> None:
        self.peak_lr = peak_lr

    def fit_start(self, state: State, logger: Logger) -> None:
        for scheduler in state.schedulers:
            loaded = sorted(set(scheduler.base_lrs) - {self.peak_lr})
            if loaded:
                log.warning(
                    "optimizer.lr is %g but the loaded checkpoint's schedule scaled %s: the schedule now scales %g",
                    self.peak_lr,
                    ", ".join(f"{lr:g}" for lr in loaded),
                    self.peak_lr,
                )
            fresh_clock = int(state.timestamp.batch) == 0
            for i, group in enumerate(scheduler.optimizer.param_groups):
                if fresh_clock:
                    group["lr"] = self.peak_lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
                else:
                    group["lr"] *= self.peak_lr / group.get("initial_lr", scheduler.base_lrs[i])
                scheduler.base_lrs[i] = self.peak_lr
                group["initial_lr"] = self.peak_lr
