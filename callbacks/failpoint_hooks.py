"""The failpoints at Composer events (``common/failpoints.py``); added only when one is armed."""

from __future__ import annotations

import math

from composer.core import Callback, Event, State
from composer.loggers import Logger

from common import failpoints

EVENTS = {
    Event.BATCH_END: "batch_end",
    Event.EVAL_BATCH_END: "eval_batch_end",
    Event.BATCH_CHECKPOINT: "batch_checkpoint",
}


class FailpointHooks(Callback):
    """Kill the process at an armed event failpoint, or make an armed batch's loss NaN."""

    def __init__(self) -> None:
        self._poison = False

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self._poison = failpoints.reached("nan_loss")  # counted in batches, not micro-batches
        elif event == Event.AFTER_LOSS and self._poison:
            state.loss = state.loss * math.nan
        elif event in EVENTS:
            failpoints.hit(EVENTS[event])
