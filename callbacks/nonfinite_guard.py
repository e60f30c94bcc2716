"""A non-finite loss or gradient never trains on silently, and no checkpoint holds non-finite weights.

Checked on every batch, after the backward pass of all micro-batches and before the optimizer
step (``Event.AFTER_TRAIN_BATCH``): every micro-batch's loss and every gradient this rank holds.
The verdict is all-reduced (MAX of a flag), so every rank acts alike. Then, by policy:

* ``stop`` (when the run has no loss-spike rollback): the run ends with ``NonFiniteError``, naming
  the batch, the loss, the first parameters whose gradients are not finite, and the fixes. The
  optimizer has not stepped: the weights are those of the last step, and no checkpoint is written
  for this batch (Composer's savers do not run after an error).
* ``rollback`` (``callbacks.loss_spike`` is on): the gradients are dropped, so the optimizer step
  changes nothing, and the batch's loss is reported as NaN to ``LossSpikeRollback``, which restores
  the last good checkpoint and skips the data, as for any spike (``callbacks/loss_spike.py``).

Before every checkpoint (``Event.BATCH_CHECKPOINT``, before the savers, which run after every
other callback) the weights are checked too: a non-finite weight stops the run, so no checkpoint,
``latest`` or pre-decay, is ever written from such weights.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from callbacks.loss_spike import LOSS_KEY, LossSpikeRollback
from common.cli import RunStopped

Policy = Literal["stop", "rollback"]
_LISTED = 5


class NonFiniteError(RunStopped):
    """Training met a non-finite loss, gradient or weight and stopped before using it."""


def _nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one fused pass over all of them)."""
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named])
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (every rank checks its own part)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class NonFiniteGuard(Callback):
    """Stop, or hand to the loss-spike rollback, any batch whose loss or gradients are not finite."""

    def __init__(self) -> None:
        self.policy: Policy = "stop"
        self._bad_loss = False
        self._bad_batch = False
        self._detail = ""

    def fit_start(self, state: State, logger: Logger) -> None:
        has_rollback = any(isinstance(cb, LossSpikeRollback) for cb in state.callbacks)
        self.policy = "rollback" if has_rollback else "stop"

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            # Every micro-batch's loss; only a flag is kept (no host sync per micro-batch).
            self._bad_loss = self._bad_loss or bool(
                state.loss is not None and not torch.isfinite(state.loss).all()
            )
        elif event == Event.AFTER_TRAIN_BATCH:
            self._check_batch(state)
        elif event == Event.BATCH_END and self._bad_batch:
            # Seen by LossSpikeRollback (after this callback), which then rolls back.
            state.total_loss_dict[LOSS_KEY] = math.nan
            self._bad_batch = False
        elif event == Event.BATCH_CHECKPOINT:
            self._check_weights(state)
        super().run_event(event, state, logger)

    def _check_batch(self, state: State) -> None:
        grads = [(n, _local(p.grad)) for n, p in state.model.named_parameters() if p.grad is not None]
        bad_grads = _nonfinite_names(grads)
        flag = torch.tensor([1.0 if (self._bad_loss or bad_grads) else 0.0])
        dist.all_reduce(flag, reduce_operation="MAX")
        bad_loss, self._bad_loss = self._bad_loss, False
        if not flag.item():
            return
        batch = int(state.timestamp.batch)
        where = "a loss" if bad_loss else ("gradients" if bad_grads else "another rank's loss or gradients")
        listed = ", ".join(bad_grads[:_LISTED]) + (
            f" and {len(bad_grads) - _LISTED} more" if len(bad_grads) > _LISTED else ""
        )
        self._detail = f"{where} not finite at batch {batch}" + (
            f" (gradients of {listed})" if bad_grads else ""
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"training stopped: {self._detail}. The optimizer did not step and no checkpoint was written "
                "for this batch; the last checkpoint is good and the same command resumes from it. Fixes: "
                "lower optimizer.lr or lengthen the warmup, check the data of this batch, or turn on "
                "callbacks.loss_spike to roll back to the last good checkpoint and skip the data"
            )
        for param in state.model.parameters():
            param.grad = None  # the optimizer step leaves every weight as it is
        self._bad_batch = True

    def _check_weights(self, state: State) -> None:
        bad = _nonfinite_names([(n, _local(p)) for n, p in state.model.named_parameters()])
        flag = torch.tensor([1.0 if bad else 0.0])
        dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item():
            raise NonFiniteError(
                f"training stopped before a checkpoint: weights are not finite at batch {int(state.timestamp.batch)} "
                f"({', '.join(bad[:_LISTED]) or 'on another rank'}); nothing was saved. The last checkpoint is "
                "good; lower optimizer.lr, or turn on callbacks.loss_spike"
            )
