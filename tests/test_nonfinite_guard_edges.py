"""The NonFiniteGuard's edges: its exact messages, how many culprits it lists, which savers make it
scan the weights, and its helpers on each kind of loss (the mutation tests' reference,
``python -m tests.mutants nonfinite_guard``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from composer import Algorithm, Callback, Event
from composer.core import State
from composer.loggers import Logger

from callbacks.loss_spike import LOSS_KEY, LossSpikeRollback
from callbacks.nonfinite_guard import (
    NonFiniteError,
    NonFiniteGuard,
    _all_finite,
    _local,
    _losses,
    _nonfinite_names,
)
from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
from callbacks.schedulers import WarmupStableDecayScheduler
from models.composer_model import ComposerMambaLM
from models.config import preset
from tests.test_reliability import Poison, poisoned_trainer


class NaNWeight(Algorithm):
    """Sets ``count`` weights to NaN at the end of batch ``batch`` (after the optimizer step, before the
    savers)."""

    def __init__(self, batch: int, count: int = 1) -> None:
        self.batch, self.count = batch, count

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_END and int(state.timestamp.batch) == self.batch

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        with torch.no_grad():
            for param in list(state.model.parameters())[: self.count]:
                param.view(-1)[0] = float("nan")


class NaNLossOnce(Algorithm):
    """Adds NaN to the loss of the first micro-batch of batch ``batch`` only: that loss is NaN, yet no
    gradient is (a constant added to a loss leaves its gradient as it is)."""

    def __init__(self, batch: int) -> None:
        self.batch, self.fired = batch, False

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_LOSS and int(state.timestamp.batch) == self.batch and not self.fired

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        self.fired = True
        state.loss = state.loss + float("nan")


class LossSeen(Callback):
    """Records at every batch end, between the guard and the rollback, the loss the rollback will see."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.seen.append((int(state.timestamp.batch), float(state.total_loss_dict.get(LOSS_KEY, 0.0))))


def stop_message(detail: str) -> str:
    return (
        f"training stopped: {detail}. The optimizer did not step and no checkpoint was written for this "
        "batch; the last checkpoint is good and the same command resumes from it. Fixes: lower "
        "optimizer.lr or lengthen the warmup, check the data of this batch, or turn on "
        "callbacks.loss_spike to roll back to the last good checkpoint and skip the data"
    )


def weight_message(batch: int, names: str) -> str:
    return (
        f"training stopped before a checkpoint: weights are not finite at batch {batch} ({names}); nothing "
        "was saved. The last checkpoint is good; lower optimizer.lr, or turn on callbacks.loss_spike"
    )


# ----------------------------------------------------------------------------------------------
# The helpers


def test_losses_takes_a_tensor_a_dict_or_a_sequence_and_ignores_the_rest() -> None:
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(2.0)
    assert [t.item() for t in _losses(a)] == [1.0] and not _losses(a)[0].requires_grad
    assert [t.item() for t in _losses({"x": a, "y": b})] == [1.0, 2.0]
    assert [t.item() for t in _losses([a, "not a tensor", b])] == [1.0, 2.0]
    assert [t.item() for t in _losses((b,))] == [2.0]
    assert _losses(3.0) == [] and _losses(None) == []


def test_all_finite_and_the_names_of_the_culprits() -> None:
    finite, nan, inf = torch.ones(3), torch.tensor([1.0, math.nan]), torch.tensor([-math.inf])
    half = torch.ones(2, dtype=torch.float16)
    assert bool(_all_finite([finite, half])) and not bool(_all_finite([finite, nan]))
    assert not bool(_all_finite([inf])) and _all_finite([finite]).dtype == torch.bool
    named = [("a", finite), ("b", nan), ("c", half), ("d", inf)]
    assert _nonfinite_names(named) == ["b", "d"]
    assert _nonfinite_names([]) == [] and _nonfinite_names([("a", finite)]) == []
    assert _local(finite) is finite


def test_local_takes_the_shard_of_a_sharded_tensor() -> None:
    # An FSDP2 parameter is a DTensor; what the guard checks is its to_local() (this rank's shard).
    class Sharded:
        def __init__(self, shard: torch.Tensor) -> None:
            self.shard = shard

        def to_local(self) -> torch.Tensor:
            return self.shard

    shard = torch.tensor([math.nan])
    assert _local(Sharded(shard)) is shard  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The stop messages, exactly


def test_a_nan_loss_names_the_first_five_gradients_and_counts_the_others(tmp_path: Path) -> None:
    trainer = poisoned_trainer(tmp_path, Poison(3, "loss"))
    names = [n for n, p in trainer.state.model.named_parameters() if p.requires_grad]
    assert len(names) > 6  # a NaN loss makes every gradient NaN
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    listed = ", ".join(names[:5]) + f" and {len(names) - 5} more"
    assert str(info.value) == stop_message(f"a loss not finite at batch 3 (gradients of {listed})")


def test_one_infinite_gradient_is_named_alone(tmp_path: Path) -> None:
    trainer = poisoned_trainer(tmp_path, Poison(2, "grad"))
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    detail = "gradients not finite at batch 2 (gradients of model.backbone.embedding.weight)"
    assert str(info.value) == stop_message(detail)


def test_a_nan_loss_of_one_micro_batch_stops_though_every_gradient_is_finite(tmp_path: Path) -> None:
    # Two micro-batches per batch: the first one's NaN loss must not be forgotten by the second's.
    trainer = poisoned_trainer(
        tmp_path, Poison(99, "grad"), algorithms=[NaNLossOnce(3)], device_train_microbatch_size=2
    )
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    assert str(info.value) == stop_message("a loss not finite at batch 3")


def started(tmp_path: Path) -> tuple[NonFiniteGuard, State, Logger]:
    """A guard on a real Trainer's state before any batch (no loss seen, no gradient yet)."""
    trainer = poisoned_trainer(tmp_path, Poison(99, "grad"))
    guard = next(cb for cb in trainer.state.callbacks if isinstance(cb, NonFiniteGuard))
    return guard, trainer.state, trainer.logger


def test_before_any_loss_only_the_gradients_decide(tmp_path: Path) -> None:
    guard, state, logger = started(tmp_path)
    assert guard.policy == "stop"  # until fit_start finds a rollback
    guard.run_event(Event.AFTER_TRAIN_BATCH, state, logger)  # no loss, no gradient: nothing to stop
    params = list(state.model.named_parameters())
    for _, param in params:
        param.grad = torch.zeros_like(param)
    guard.run_event(Event.AFTER_TRAIN_BATCH, state, logger)  # finite gradients, no loss
    for _, param in params[:5]:
        param.grad.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError) as info:
        guard.run_event(Event.AFTER_TRAIN_BATCH, state, logger)
    listed = ", ".join(name for name, _ in params[:5])  # exactly five: no "and 0 more"
    assert str(info.value) == stop_message(f"gradients not finite at batch 0 (gradients of {listed})")


def test_a_flag_from_another_rank_alone_stops_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another rank's verdict arrives through the all-reduce; here the all-reduce says "set".
    guard, state, logger = started(tmp_path)
    for param in state.model.parameters():
        param.grad = torch.zeros_like(param)
    monkeypatch.setattr("callbacks.nonfinite_guard.any_rank", lambda device, flag: True)
    with pytest.raises(NonFiniteError) as info:
        guard.run_event(Event.AFTER_TRAIN_BATCH, state, logger)
    assert str(info.value) == stop_message("another rank's loss or gradients not finite at batch 0")
    with pytest.raises(NonFiniteError) as info:
        guard._check_weights(state)
    assert str(info.value) == weight_message(0, "on another rank")


# ----------------------------------------------------------------------------------------------
# The weights, before each checkpoint


def test_the_weights_are_scanned_once_per_checkpoint_written(tmp_path: Path) -> None:
    trainer = poisoned_trainer(tmp_path, Poison(99, "grad"))  # never fires
    trainer.fit()
    guard = next(cb for cb in trainer.state.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.policy == "stop"
    assert sorted(p.name for p in tmp_path.glob("ep*")) == [f"ep0-ba{b}-rank0.pt" for b in (2, 4, 6, 8)]
    assert guard.weight_scans == 4  # 8 batches, a checkpoint every 2


def test_a_nan_weight_stops_the_run_before_the_checkpoint(tmp_path: Path) -> None:
    trainer = poisoned_trainer(tmp_path, Poison(99, "grad"), algorithms=[NaNWeight(4)])
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    assert str(info.value) == weight_message(4, "model.backbone.embedding.weight")
    assert sorted(p.name for p in tmp_path.glob("ep*")) == ["ep0-ba2-rank0.pt"]  # ba4 was not written


def test_the_pre_decay_saver_alone_makes_the_guard_scan_the_weights(tmp_path: Path) -> None:
    # No Trainer saver: only the pre-decay checkpoint, at the end of the stable phase (4 of 8 batches).
    def run(*algorithms: Algorithm) -> tuple[NonFiniteGuard, Path]:
        folder = tmp_path / f"pre-decay-{len(algorithms)}"
        pre_decay = PreDecayCheckpoint(WarmupStableDecayScheduler("0ba", 0.5), str(folder))
        trainer = poisoned_trainer(
            tmp_path, Poison(99, "grad"), pre_decay, save_folder=None, algorithms=list(algorithms)
        )
        guard = next(cb for cb in trainer.state.callbacks if isinstance(cb, NonFiniteGuard))
        try:
            trainer.fit()
        finally:
            trainer.close()
        return guard, folder

    guard, folder = run()
    assert guard.weight_scans == 1 and [p.name for p in folder.iterdir()] == ["pre-decay-ba4.pt"]
    with pytest.raises(NonFiniteError) as info:
        run(NaNWeight(4, count=2))
    first_two = [name for name, _ in ComposerMambaLM(preset("debug")).named_parameters()][:2]
    assert str(info.value) == weight_message(4, ", ".join(first_two))
    assert not (tmp_path / "pre-decay-1").exists() or not list((tmp_path / "pre-decay-1").iterdir())


# ----------------------------------------------------------------------------------------------
# The rollback policy


def test_with_rollback_only_the_bad_batch_reports_a_nan_loss(tmp_path: Path) -> None:
    seen = LossSeen()
    rollback = LossSpikeRollback(window=4, warmup_batches=2)
    trainer = poisoned_trainer(tmp_path, Poison(5, "grad"), seen, rollback)
    guard = next(cb for cb in trainer.state.callbacks if isinstance(cb, NonFiniteGuard))
    trainer.fit()
    assert guard.policy == "rollback" and rollback.rollbacks == 1
    # The guard leaves its NaN once, for the rollback to see, and no other batch's loss is touched.
    # The poisoned batch is batch 5 (0-based); at its end the timestamp counts 6 batches.
    assert [b for b, loss in seen.seen if math.isnan(loss)] == [6]
    assert len(seen.seen) == 8 and all(math.isfinite(loss) for b, loss in seen.seen if b != 6)
