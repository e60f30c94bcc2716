"""A non-finite loss or gradient never trains on silently, and no checkpoint holds non-finite weights.

Checked on every optimizer step, without a host sync per micro-batch: each micro-batch's loss
(``Event.AFTER_LOSS``) is folded into a flag that stays on the device; after the backward pass of
all micro-batches and before the optimizer step (``Event.AFTER_TRAIN_BATCH``) the gradients this
rank holds are checked with one fused ``torch._foreach_norm`` (a NaN or an infinity anywhere makes
a norm non-finite), and the flag is all-reduced once (an int32 MAX on the run's device,
``common.distributed.any_rank``), so every rank acts alike. Only when it is set are the names
of the culprits looked up. Then, by policy:

* ``stop`` (when the run has no loss-spike rollback): the run ends with ``NonFiniteError``, naming
  the batch, the loss, the first parameters whose gradients are not finite, and the fixes. The
  optimizer has not stepped: the weights are those of the last step, and no checkpoint is written
  for this batch (Composer's savers do not run after an error).
* ``rollback`` (``callbacks.loss_spike`` is on): the gradients are dropped, so the optimizer step
  changes nothing, and the batch's loss is reported as NaN to ``LossSpikeRollback``, which restores
  the last good checkpoint and skips the data, as for any spike (``callbacks/loss_spike.py``).

Before a checkpoint is written the weights are checked too: at a checkpoint event
(``Event.BATCH_CHECKPOINT`` fires after every batch, before the savers, which run after every
other callback) the guard asks each of the run's ``CheckpointSaver``s (the pre-decay one included)
whether it is about to save, with the saver's own rule, and scans the weights only then. A
non-finite weight stops the run, so no checkpoint, ``latest`` or pre-decay, is ever written from
such weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger

from callbacks.loss_spike import LOSS_KEY, LossSpikeRollback
from common.cli import RunStopped
from common.distributed import any_rank

Policy = Literal["stop", "rollback"]
_LISTED = 5
_CHECKPOINT_EVENTS = (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT, Event.ITERATION_CHECKPOINT)


class NonFiniteError(RunStopped):
    """Training met a non-finite loss, gradient or weight and stopped before using it."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool on the tensors' device: every element of every tensor is finite (no host sync)."""
    norms = torch._foreach_norm(tensors)
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def _nonfinite_names(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one fused pass; syncs the host)."""
    if not named:
        return []
    norms = torch._foreach_norm([t.detach() for _, t in named])
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (every rank checks its own part)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _losses(loss: object) -> list[torch.Tensor]:
    """The tensors of a micro-batch's loss (a tensor, or a dict or sequence of them)."""
    if isinstance(loss, torch.Tensor):
        return [loss.detach()]
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        return [t.detach() for t in loss if isinstance(t, torch.Tensor)]
    return []


def _saves_now(saver: CheckpointSaver) -> Callable[[State, Event], bool]:
    """The saver's own rule for writing a checkpoint at this event (as ``CheckpointSaver`` applies it)."""

    def due(state: State, event: Event) -> bool:
        assert callable(saver.save_interval)
        return (
            bool(saver.save_interval(state, event)) and saver.last_checkpoint_batch != state.timestamp.batch
        )

    return due


class NonFiniteGuard(Callback):
    """Stop, or hand to the loss-spike rollback, any batch whose loss or gradients are not finite."""

    def __init__(self) -> None:
        self.policy: Policy = "stop"
        self._finite_loss: torch.Tensor | None = None  # on the device: every micro-batch's loss so far
        self._bad_batch = False
        self._detail = ""
        self._save_rules: list[Callable[[State, Event], bool]] = []
        self.weight_scans = 0  # how many times the weights were checked (once per checkpoint written)

    def fit_start(self, state: State, logger: Logger) -> None:
        has_rollback = any(isinstance(cb, LossSpikeRollback) for cb in state.callbacks)
        self.policy = "rollback" if has_rollback else "stop"
        # The Trainer's saver and the savers callbacks hold (the pre-decay checkpoint's).
        savers = [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver)]
        savers += [
            cb.saver for cb in state.callbacks if isinstance(getattr(cb, "saver", None), CheckpointSaver)
        ]
        self._save_rules = [_saves_now(saver) for saver in savers]

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.AFTER_LOSS:
            losses = _losses(state.loss)
            if losses:
                finite = _all_finite(losses)
                self._finite_loss = finite if self._finite_loss is None else self._finite_loss & finite
        elif event == Event.AFTER_TRAIN_BATCH:
            self._check_batch(state)
        elif event == Event.BATCH_END and self._bad_batch:
            # Seen by LossSpikeRollback (after this callback), which then rolls back.
            state.total_loss_dict[LOSS_KEY] = math.nan
            self._bad_batch = False
        elif event in _CHECKPOINT_EVENTS and any(due(state, event) for due in self._save_rules):
            self._check_weights(state)
        super().run_event(event, state, logger)

    def _check_batch(self, state: State) -> None:
        grads = [(n, _local(p.grad)) for n, p in state.model.named_parameters() if p.grad is not None]
        finite_loss, self._finite_loss = self._finite_loss, None
        finite = finite_loss
        if grads:
            finite_grads = _all_finite([g for _, g in grads])
            finite = finite_grads if finite is None else finite & finite_grads
        if finite is None:
            finite = True
        if not any_rank(state.device, ~finite if isinstance(finite, torch.Tensor) else not finite):
            return
        batch = int(state.timestamp.batch)
        bad_loss = finite_loss is not None and not bool(finite_loss)
        bad_grads = _nonfinite_names(grads)
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
        self.weight_scans += 1
        weights = [(n, _local(p).detach()) for n, p in state.model.named_parameters()]
        finite = _all_finite([w for _, w in weights]) if weights else True
        if not any_rank(state.device, ~finite if isinstance(finite, torch.Tensor) else not finite):
            return
        bad = _nonfinite_names(weights)
        raise NonFiniteError(
            f"training stopped before a checkpoint: weights are not finite at batch {int(state.timestamp.batch)} "
            f"({', '.join(bad[:_LISTED]) or 'on another rank'}); nothing was saved. The last checkpoint is "
            "good; lower optimizer.lr, or turn on callbacks.loss_spike"
        )
