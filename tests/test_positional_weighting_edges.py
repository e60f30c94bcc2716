"""Positional weighting: the weight functions at their edges and every line a user reads, by hand.

Complements tests/test_positional_weighting.py (make mutants showed these values and messages
unpinned there).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger

from callbacks.positional_weighting import PositionalLossWeighting, positional_weights, sequence_position_ids


def apply_to(algo: PositionalLossWeighting, batch: object) -> State:
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU())
    state.batch = batch
    algo.apply(Event.AFTER_DATALOADER, state, Logger(state))
    return state


def test_linear_weights_ramp_to_one_and_stay() -> None:
    positions = torch.arange(26)
    got = positional_weights(positions, scale=10.0, fn="linear").tolist()
    assert got == pytest.approx([min(1.0, p / 10) for p in range(26)], abs=1e-7)
    assert got[15] == 1.0 and got[25] == 1.0


def test_a_scale_below_one_is_valid() -> None:
    """Any positive scale works: 0.5 weighs position 1 as tanh(2)."""
    got = positional_weights(torch.tensor([0, 1, 3]), scale=0.5).tolist()
    assert got == pytest.approx([0.0, math.tanh(2.0), math.tanh(6.0)], abs=1e-7)
    algo = PositionalLossWeighting(scale=0.5, fn="linear")
    state = apply_to(
        algo, {"input_ids": torch.zeros(1, 3, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2]])}
    )
    assert state.batch["loss_weights"].tolist() == [[0.0, 1.0, 1.0]]  # min(1, p / 0.5)


def test_sequence_positions_count_from_each_sample_start_on_the_batch_device() -> None:
    ids = torch.zeros(3, 5, dtype=torch.long)
    assert sequence_position_ids(ids).tolist() == [[0, 1, 2, 3, 4]] * 3
    on_meta = sequence_position_ids(torch.zeros(2, 4, dtype=torch.long, device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 4)


def test_weights_are_float32_whatever_the_default_dtype() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert positional_weights(torch.arange(4)).dtype == torch.float32
        assert positional_weights(torch.arange(4), fn="linear").dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: positional_weights(torch.arange(3), scale=0),
            "positional weighting: scale=0 must be > 0 (the paper uses 10)",
        ),
        (
            lambda: positional_weights(torch.arange(3), scale=-2.0),
            "positional weighting: scale=-2.0 must be > 0 (the paper uses 10)",
        ),
        (
            lambda: positional_weights(torch.arange(3), fn="sigmoid"),
            "positional weighting: unknown fn 'sigmoid'; valid: tanh, linear",
        ),
        (
            lambda: PositionalLossWeighting(scale=0),
            "PositionalLossWeighting: scale=0 must be > 0 (the paper uses 10)",
        ),
        (
            lambda: PositionalLossWeighting(fn="sigmoid"),  # type: ignore[arg-type]
            "PositionalLossWeighting: unknown fn 'sigmoid'; valid: tanh, linear",
        ),
        (
            lambda: apply_to(PositionalLossWeighting(), (torch.zeros(1),)),
            "PositionalLossWeighting needs dict batches with 'input_ids' (and 'position_ids'); got tuple",
        ),
        (
            lambda: apply_to(PositionalLossWeighting(), {"position_ids": torch.zeros(1, 3)}),
            "PositionalLossWeighting needs dict batches with 'input_ids' (and 'position_ids'); got dict",
        ),
        (
            lambda: apply_to(
                PositionalLossWeighting(),
                {"input_ids": torch.zeros(2, 7, dtype=torch.long), "position_ids": torch.zeros(2, 6)},
            ),
            "PositionalLossWeighting: position_ids (2, 6) must have the shape of input_ids (2, 7)",
        ),
    ],
)
def test_each_error_line_word_for_word(call, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_the_missing_position_ids_warning_word_for_word() -> None:
    message = (
        "PositionalLossWeighting(per_document=True): the batch has no 'position_ids', so positions are counted "
        "from each sample's start (arange); emit position_ids from the data loader, or set per_document=False "
        "to silence this warning"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_to(PositionalLossWeighting(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    assert [str(w.message) for w in caught] == [message]
    assert caught[0].category is UserWarning
