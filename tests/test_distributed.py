"""Every tensor this repository hands to a collective lives on the run's device.

The run's device here is a recording stand-in for Composer's ``DeviceCPU``: every tensor its
``tensor_to_device`` returns is remembered. Composer's collectives are wrapped so that a call
made from this repository's code (not Composer's own) must hand over one of those very tensors;
a flag built with ``torch.tensor([...])`` on the CPU, as NCCL would reject on a GPU, fails. The
real callbacks run inside a real Trainer, through a NaN, a rollback and checkpoint saves.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.devices import DeviceCPU
from composer.utils import dist

from callbacks.loss_spike import LossSpikeRollback
from callbacks.nonfinite_guard import NonFiniteError, NonFiniteGuard
from tests.test_reliability import Poison, poisoned_trainer

ROOT = Path(__file__).resolve().parents[1]
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object")


class RecordingDevice(DeviceCPU):
    """The run's device: remembers every tensor it placed."""

    def __init__(self) -> None:
        super().__init__()
        self.placed: list[torch.Tensor] = []

    def tensor_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        placed = super().tensor_to_device(tensor)
        self.placed.append(placed)
        return placed


class Collectives:
    """Wraps Composer's collectives; checks and counts the calls this repository's code makes."""

    def __init__(self, device: RecordingDevice) -> None:
        self.device = device
        self.calls: list[str] = []
        self.wrong: list[str] = []

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            caller = Path(inspect.stack()[1].filename).resolve()
            if ROOT in caller.parents and ".venv" not in caller.parts:
                where = f"{name} from {caller.relative_to(ROOT)}"
                self.calls.append(where)
                if name in TENSOR_COLLECTIVES:
                    tensor = args[0] if args else next(iter(kwargs.values()))
                    if not any(tensor is placed for placed in self.device.placed):
                        self.wrong.append(f"{where}: a tensor not placed by state.device ({tensor.device})")
                    elif tensor.dtype == torch.bool:
                        self.wrong.append(f"{where}: a bool tensor (NCCL reduces int32, not bool)")
            return original(*args, **kwargs)

        return recorded


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[RecordingDevice, Collectives]:
    device = RecordingDevice()
    collectives = Collectives(device)
    for name in (*TENSOR_COLLECTIVES, *OBJECT_COLLECTIVES):
        monkeypatch.setattr(dist, name, collectives.wrap(name, getattr(dist, name)))
    return device, collectives


def test_the_guard_stops_with_one_flag_per_step_on_the_device(
    tmp_path: Path, recorded: tuple[RecordingDevice, Collectives]
) -> None:
    device, collectives = recorded
    run = poisoned_trainer(tmp_path, Poison(3, "grad"), device=device, device_train_microbatch_size=2)
    with pytest.raises(NonFiniteError, match="not finite at batch 3"):
        run.fit()
    assert collectives.wrong == []
    guard = "all_reduce from common/distributed.py"
    # Batches 0-3, two micro-batches each: one reduction per step, plus one before the checkpoint at ba2.
    assert collectives.calls == [guard] * 5
    assert run.state.callbacks[0].weight_scans == 1


@pytest.mark.slow
def test_the_rollback_agrees_on_the_device_and_scans_weights_only_before_a_save(
    tmp_path: Path, recorded: tuple[RecordingDevice, Collectives]
) -> None:
    device, collectives = recorded
    rollback = LossSpikeRollback(window=4, warmup_batches=2)
    run = poisoned_trainer(
        tmp_path, Poison(5, "loss"), rollback, device=device, device_train_microbatch_size=2
    )
    run.fit()
    assert rollback.rollbacks == 1
    assert collectives.wrong == []
    assert "broadcast_object_list from common/distributed.py" in collectives.calls
    saved = sorted(p.name for p in tmp_path.glob("ep*"))
    assert saved == ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt", "ep0-ba8-rank0.pt"]
    guard = next(cb for cb in run.state.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.weight_scans == len(saved)


def test_no_collective_outside_the_helper() -> None:
    """Every collective of the repository's code goes through common/distributed.py."""
    call = re.compile(
        r"\b(?:dist|torch_dist|distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*)\("
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("callbacks", "common", "data", "eval", "handover", "models", "recipes")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "distributed.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if call.search(line)
    ]
    assert offenders == []
