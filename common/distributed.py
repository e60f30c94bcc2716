"""What ranks agree on: flags, counters and verdicts, each put on the run's device before a collective.

Every collective of this repository's own code goes through this module, so that the rule of
the distributed code holds in one place: a tensor handed to a collective lives on the run's
device (``state.device``, Composer's ``Device``; ``Device.tensor_to_device`` puts it there). NCCL
(every GPU run, even one GPU under the composer launcher) rejects CPU tensors, and gloo on a CPU
machine hides the mistake. Flags are int32, which NCCL reduces (it has no bool), as torchtitan's
``dist_utils`` keeps its non-finite flag. Each function syncs the host once, when it returns a
Python value; call them once per optimizer step at most, never per micro-batch.

Object collectives (``broadcast_object``, ``agree``) pickle Python values; torch places their byte
tensors itself (on the current CUDA device under NCCL, which Composer sets at start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from composer.devices import Device
from composer.utils import dist

T = TypeVar("T")


def _target(device: Device) -> torch.device:
    """The torch device behind Composer's ``device`` (its ``DeviceCPU`` / ``DeviceGPU`` both set ``_device``)."""
    return device._device


def on_device(device: Device, value: torch.Tensor | bool | int | float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a 1-element ``dtype`` tensor on the run's device (no copy when it already is one)."""
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=dtype, device=_target(device))
    return device.tensor_to_device(value.detach().reshape(1).to(dtype))


def any_rank(device: Device, flag: torch.Tensor | bool) -> bool:
    """Whether ``flag`` is set on any rank: one MAX all-reduce of an int32 on the device, one host sync."""
    tensor = on_device(device, flag, torch.int32)
    dist.all_reduce(tensor, reduce_operation="MAX")
    return bool(tensor.item())


def sum_over_ranks(device: Device, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks of ``values`` (float64, on the device; the caller syncs if it must)."""
    if not isinstance(values, torch.Tensor):
        values = torch.tensor(list(values), dtype=torch.float64, device=_target(device))
    tensor = device.tensor_to_device(values.detach().to(torch.float64).clone())
    dist.all_reduce(tensor, reduce_operation="SUM")
    return tensor


def broadcast_object(value: T, src: int = 0) -> T:
    """``value`` as global rank ``src`` holds it, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(device: Device, problems: Sequence[str]) -> list[str]:
    """The same verdict on every rank: every problem any rank found, in rank order, each once; or [].

    Every rank calls it with what it found (often nothing). One flag is all-reduced; only when
    some rank found a problem are the messages gathered, so a healthy start costs one int32.
    """
    if not any_rank(device, bool(problems)):
        return []
    gathered = dist.all_gather_object(list(problems))
    return list(dict.fromkeys(problem for found in gathered for problem in found))
