"""Positional loss weighting against float64 hand computations, and the algorithm in a real Trainer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from composer.models import ComposerModel

from callbacks.positional_weighting import PositionalLossWeighting, positional_weights
from models.composer_model import lm_cross_entropy as weighted_cross_entropy

# Sample 0 packs the tail of a document (started 3 tokens before the sample) and a new document
# starting at t = 3; sample 1 is one document from its start. Sample 1 has one padded label.
POSITION_IDS = [[3, 4, 5, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]
LABELS = [[2, 0, 4, 1, 1, 3, 0], [4, 4, 2, 0, 3, 1, -100]]
VOCAB = 5


def hand_loss(logits: list, labels: list, weights: list | None) -> float:
    """sum(w * ce) / sum(w) over valid labels, token by token in float64 with math.log/exp."""
    numerator = denominator = 0.0
    for b, row in enumerate(labels):
        for t, label in enumerate(row):
            if label == -100:
                continue
            z = logits[b][t]
            top = max(z)
            ce = top + math.log(sum(math.exp(v - top) for v in z)) - z[label]
            w = 1.0 if weights is None else weights[b][t]
            numerator += w * ce
            denominator += w
    return numerator / denominator


def tanh_weights(positions: list, scale: float = 10.0) -> list:
    return [[math.tanh(p / scale) for p in row] for row in positions]


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(2, 7, VOCAB, generator=torch.Generator().manual_seed(0)) * 3.0


def test_weighted_loss_equals_hand_computation(logits: torch.Tensor) -> None:
    position_ids = torch.tensor(POSITION_IDS)
    weights = positional_weights(position_ids)
    assert weights.dtype == torch.float32 and weights.shape == position_ids.shape
    got = weighted_cross_entropy(logits, torch.tensor(LABELS), weights)
    expected = hand_loss(logits.double().tolist(), LABELS, tanh_weights(POSITION_IDS))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Differs from the unweighted mean, which also matches its own hand computation.
    plain = weighted_cross_entropy(logits, torch.tensor(LABELS))
    assert plain.item() == pytest.approx(hand_loss(logits.double().tolist(), LABELS, None), rel=1e-6)
    assert abs(plain.item() - expected) > 1e-3


def test_weights_restart_at_each_document() -> None:
    weights = positional_weights(torch.tensor(POSITION_IDS))
    assert weights[0, 3].item() == 0.0 and weights[1, 0].item() == 0.0  # each document's first token
    assert weights.tolist() == pytest.approx(
        [pytest.approx(row, abs=1e-7) for row in tanh_weights(POSITION_IDS)]
    )
    assert weights[0, 0].item() == pytest.approx(math.tanh(0.3), abs=1e-7)  # mid-document offset kept
    assert positional_weights(torch.tensor([0, 5, 20]), scale=10.0, fn="linear").tolist() == [0.0, 0.5, 1.0]


def test_ignored_labels_are_out_of_numerator_and_denominator(logits: torch.Tensor) -> None:
    labels = torch.tensor(LABELS)
    weights = positional_weights(torch.tensor(POSITION_IDS))
    base = weighted_cross_entropy(logits, labels, weights)
    changed_logits, changed_weights = logits.clone(), weights.clone()
    changed_logits[1, 6] = 100.0 * torch.arange(VOCAB)  # the ignored position
    changed_weights[1, 6] = 1e6
    assert weighted_cross_entropy(changed_logits, labels, changed_weights).item() == pytest.approx(
        base.item()
    )
    # With unit weights the loss is torch's own mean cross-entropy with ignore_index.
    reference = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    ones = torch.ones_like(weights)
    assert weighted_cross_entropy(logits, labels, ones).item() == pytest.approx(reference.item(), rel=1e-6)


def test_bf16_logits_use_a_float32_cross_entropy(logits: torch.Tensor) -> None:
    bf16 = (logits * 4).to(torch.bfloat16)
    weights = positional_weights(torch.tensor(POSITION_IDS))
    got = weighted_cross_entropy(bf16, torch.tensor(LABELS), weights)
    expected = hand_loss(bf16.double().tolist(), LABELS, tanh_weights(POSITION_IDS))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_all_zero_weights_give_zero_not_nan(logits: torch.Tensor) -> None:
    labels = torch.tensor(LABELS)
    loss = weighted_cross_entropy(logits.requires_grad_(), labels, torch.zeros(2, 7))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    assert weighted_cross_entropy(logits, torch.full_like(labels, -100)).item() == 0.0


def _state_with_batch(batch: dict) -> State:
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU())
    state.batch = batch
    return state


def test_algorithm_adds_loss_weights_after_dataloader() -> None:
    algo = PositionalLossWeighting()
    assert algo.match(Event.AFTER_DATALOADER, _state_with_batch({}))
    assert not algo.match(Event.BATCH_START, _state_with_batch({}))
    batch = {"input_ids": torch.zeros(2, 7, dtype=torch.long), "position_ids": torch.tensor(POSITION_IDS)}
    state = _state_with_batch(batch)
    algo.apply(Event.AFTER_DATALOADER, state, Logger(state))
    assert state.batch["loss_weights"].tolist() == [
        pytest.approx(r, abs=1e-7) for r in tanh_weights(POSITION_IDS)
    ]


def test_per_sequence_positions_and_missing_position_ids() -> None:
    arange = [list(range(7))] * 2
    per_sequence = PositionalLossWeighting(per_document=False)
    batch = {"input_ids": torch.zeros(2, 7, dtype=torch.long), "position_ids": torch.tensor(POSITION_IDS)}
    state = _state_with_batch(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per_document=False ignores position_ids without warning
        per_sequence.apply(Event.AFTER_DATALOADER, state, Logger(state))
    assert state.batch["loss_weights"].tolist() == [pytest.approx(r, abs=1e-7) for r in tanh_weights(arange)]

    fallback = PositionalLossWeighting(scale=2.0)
    state = _state_with_batch({"input_ids": torch.zeros(2, 7, dtype=torch.long)})
    with pytest.warns(UserWarning, match="no 'position_ids'"):
        fallback.apply(Event.AFTER_DATALOADER, state, Logger(state))
    assert state.batch["loss_weights"].tolist() == [
        pytest.approx(r, abs=1e-7) for r in tanh_weights(arange, 2.0)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        fallback.apply(Event.AFTER_DATALOADER, state, Logger(state))


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="scale=0 must be > 0"):
        PositionalLossWeighting(scale=0)
    with pytest.raises(ValueError, match="unknown fn 'sigmoid'; valid: tanh, linear"):
        PositionalLossWeighting(fn="sigmoid")
    state = _state_with_batch(
        {"input_ids": torch.zeros(2, 7, dtype=torch.long), "position_ids": torch.zeros(2, 6)}
    )
    with pytest.raises(ValueError, match=r"position_ids \(2, 6\) must have the shape of input_ids \(2, 7\)"):
        PositionalLossWeighting().apply(Event.AFTER_DATALOADER, state, Logger(state))
    with pytest.raises(ValueError, match="dict batches"):
        state = _state_with_batch({})
        state.batch = (torch.zeros(1), torch.zeros(1))
        PositionalLossWeighting().apply(Event.AFTER_DATALOADER, state, Logger(state))


class _TinyLM(ComposerModel):
    """Embedding -> logits; its loss is the weighted cross-entropy and records the weights it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(VOCAB, VOCAB)
        self.seen: list[torch.Tensor] = []

    def forward(self, batch: dict) -> torch.Tensor:
        return self.embedding(batch["input_ids"])

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        self.seen.append(batch["loss_weights"].clone())
        return weighted_cross_entropy(outputs, batch["labels"], batch["loss_weights"])


def test_algorithm_in_a_real_trainer_with_microbatches() -> None:
    torch.manual_seed(0)
    sample = {
        "input_ids": torch.tensor(POSITION_IDS[0]) % VOCAB,
        "labels": torch.tensor(LABELS[0]),
        "position_ids": torch.tensor(POSITION_IDS[0]),
    }
    data = [sample, {**sample, "position_ids": torch.tensor(POSITION_IDS[1])}] * 2
    model = _TinyLM()
    trainer = Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(data, batch_size=2),
        max_duration="2ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[PositionalLossWeighting()],
        device="cpu",
        device_train_microbatch_size=1,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    expected = tanh_weights(POSITION_IDS)
    assert len(model.seen) == 4  # 2 batches x 2 microbatches, each with its own row of weights
    for i, weights in enumerate(model.seen):
        assert weights.shape == (1, 7)
        assert weights[0].tolist() == pytest.approx(expected[i % 2], abs=1e-7)
