"""Positional loss weighting ("Passing the Torch", section 4.2).

The first tokens of a text are predicted from almost no context, so their loss is high and
noisy. The paper multiplies each token's loss by ``w(position) = tanh(position / 10)``: the first
~30 tokens are down-weighted, later ones weigh ~1.

Convention (shapes B = batch, L = sequence length): ``labels[:, t]`` is the token after input
``t`` and ``position_ids[:, t]`` is the index of input ``t`` inside its document (0 at a
document's first token, also right after an end-of-text token; a sample cut from the middle of a
document continues from the true offset). The loss term at ``t`` gets ``w(position_ids[:, t])``,
so the prediction made from a document's first token weighs ``tanh(0) = 0``. The paper counts
positions from the start of the sequence; counting from each document's start applies the same
idea to packed samples (``per_document=False`` gives the paper's per-sequence count,
``arange(L)``). Note the prediction of a document's first token, made from the previous
document's end-of-text input, keeps that input's (large) position and so its full weight.

The weighted loss is ``sum(w * ce) / sum(w)`` over valid labels (``labels != -100``): a weighted
mean, so with all weights 1 it is the usual mean cross-entropy. Each microbatch is normalised by
its own weight sum (as Composer's mean losses are by their own token counts).
"""

from __future__ import annotations

import typing
import warnings
from typing import Literal

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import Tensor

WeightFn = Literal["tanh", "linear"]
WEIGHT_FNS: tuple[str, ...] = typing.get_args(WeightFn)


def positional_weights(position_ids: Tensor, scale: float = 10.0, fn: str = "tanh") -> Tensor:
    """Loss weights for ``position_ids`` (any shape): float32, same shape.

    ``fn='tanh'``: ``tanh(p / scale)`` (the paper, scale 10); ``fn='linear'``: ``min(1, p / scale)``.
    """
    if scale <= 0:
        raise ValueError(f"positional weighting: scale={scale} must be > 0 (the paper uses 10)")
    p = position_ids.to(torch.float32) / scale
    if fn == "tanh":
        return torch.tanh(p)
    if fn == "linear":
        return p.clamp(max=1.0)
    raise ValueError(f"positional weighting: unknown fn {fn!r}; valid: {', '.join(WEIGHT_FNS)}")


def sequence_position_ids(input_ids: Tensor) -> Tensor:
    """Positions counted from each sample's start, ignoring document boundaries: ``arange(L)`` per row."""
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(batch, length)


class PositionalLossWeighting(Algorithm):
    """Adds ``batch['loss_weights']`` (B, L, float32) = ``w(position)`` on ``Event.AFTER_DATALOADER``.

    The model's loss (``models.composer_model.lm_cross_entropy``) reads ``loss_weights``. Only training
    batches are weighted (``AFTER_DATALOADER`` runs in the training loop only), so evaluation
    losses and perplexities stay the plain mean. Composer splits the batch into microbatches
    after this event, and ``loss_weights`` is split with the other tensors.

    Args:
        scale: ``w(p) = tanh(p / scale)``; the paper uses 10.
        per_document: Count positions from each document's start (the batch's ``position_ids``);
            False counts from each sample's start (``arange(L)``). A batch without
            ``position_ids`` falls back to ``arange(L)`` with a one-time warning.
        fn: 'tanh' (the paper) or 'linear' (``min(1, p / scale)``).
    """

    def __init__(self, scale: float = 10.0, per_document: bool = True, fn: WeightFn = "tanh") -> None:
        if scale <= 0:
            raise ValueError(f"PositionalLossWeighting: scale={scale} must be > 0 (the paper uses 10)")
        if fn not in WEIGHT_FNS:
            raise ValueError(f"PositionalLossWeighting: unknown fn {fn!r}; valid: {', '.join(WEIGHT_FNS)}")
        self.scale = scale
        self.per_document = per_document
        self.fn = fn
        self._warned_no_position_ids = False

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(
                "PositionalLossWeighting needs dict batches with 'input_ids' (and 'position_ids'); "
                f"got {type(batch).__name__}"
            )
        position_ids = batch.get("position_ids") if self.per_document else None
        if self.per_document and position_ids is None and not self._warned_no_position_ids:
            warnings.warn(
                "PositionalLossWeighting(per_document=True): the batch has no 'position_ids', so positions "
                "are counted from each sample's start (arange); emit position_ids from the data loader, or "
                "set per_document=False to silence this warning",
                stacklevel=2,
            )
            self._warned_no_position_ids = True
        if position_ids is None:
            position_ids = sequence_position_ids(batch["input_ids"])
        elif position_ids.shape != batch["input_ids"].shape:
            raise ValueError(
                f"PositionalLossWeighting: position_ids {tuple(position_ids.shape)} must have the shape of "
                f"input_ids {tuple(batch['input_ids'].shape)}"
            )
        batch["loss_weights"] = positional_weights(position_ids, self.scale, self.fn)
