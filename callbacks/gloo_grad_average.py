"""Average FSDP2 gradients across ranks on the gloo backend (CPU multi-process runs).

torch 2.7's FSDP2 reduce-scatters fp32 gradients with ``ReduceOp.AVG``; gloo's
``reduce_scatter_tensor`` silently treats AVG as SUM, so every gradient comes out
``world_size`` times too large (checked here: ranks holding 1 and 2 get 3, not 1.5). NCCL is
not affected. This algorithm divides the summed gradients once per batch, after all
micro-batches and before gradient clipping and the optimizer step: put it first in the
Trainer's ``algorithms`` list. ``recipes/train.py`` adds it on gloo + FSDP2 runs.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule


def gloo_sums_fsdp2_gradients(model: torch.nn.Module) -> bool:
    """Whether this run's FSDP2 gradients are summed instead of averaged (gloo, several ranks)."""
    return (
        dist.get_world_size() > 1
        and torch_dist.is_initialized()
        and torch_dist.get_backend() == "gloo"
        and any(isinstance(m, FSDPModule) for m in model.modules())
    )


class GlooFSDP2GradAverage(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH and gloo_sums_fsdp2_gradients(state.model)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        world = dist.get_world_size()
        with torch.no_grad():
            for p in state.model.parameters():
                if p.grad is not None:
                    p.grad.div_(world)
