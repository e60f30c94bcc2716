"""The Composer wrapper: loss, per-token weights, metrics and FLOPs against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from composer.metrics.nlp import LanguageCrossEntropy

from models import composer_model
from models.composer_model import ComposerMambaLM, lm_cross_entropy, top_k_accuracy, update_in_chunks
from models.config import preset
from models.flops import forward_flops_per_token


def hand_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """sum_t w_t * (logsumexp(logits_t) - logits_t[label_t]) / sum_t w_t in float64 Python arithmetic."""
    num = den = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(v) for v in logits[b, t]]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            w = 1.0 if weights is None else float(weights[b, t])
            num += w * (lse - row[y])
            den += w
    return num / den


def test_loss_matches_hand_computation() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 2] = -100
    weights = torch.rand(2, 5)
    assert lm_cross_entropy(logits, labels).item() == pytest.approx(hand_ce(logits, labels), rel=1e-5)
    assert lm_cross_entropy(logits, labels, weights).item() == pytest.approx(
        hand_ce(logits, labels, weights), rel=1e-5
    )


def test_model_loss_reads_loss_weights() -> None:
    model = ComposerMambaLM(preset("debug"))
    ids = torch.randint(0, 500, (2, 9))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    logits = model(batch)
    plain = model.loss(logits, batch)
    assert plain.item() == pytest.approx(hand_ce(logits.detach(), batch["labels"]), rel=1e-5)
    w = torch.zeros(2, 8)
    w[0, 3] = 1.0  # only one token counts
    weighted = model.loss(logits, {**batch, "loss_weights": w})
    assert weighted.item() == pytest.approx(
        hand_ce(logits[:1, 3:4].detach(), batch["labels"][:1, 3:4]), rel=1e-5
    )


def hand_topk(logits: torch.Tensor, labels: torch.Tensor, k: int, vocab: int) -> float:
    """Fraction of valid labels ranked among the k best of the first ``vocab`` logits (a loop)."""
    hits = total = 0
    for row, label in zip(logits.reshape(-1, logits.shape[-1]).tolist(), labels.reshape(-1).tolist()):
        if label == -100:
            continue
        better = sum(score > row[label] for score in row[:vocab])
        hits += better < k
        total += 1
    return hits / total


def test_topk_accuracy_and_perplexity_metrics() -> None:
    # vocab 500 is padded to 504: the padding logits must never count as predictions.
    model = ComposerMambaLM(preset("debug", vocab_size=500))
    ids = torch.randint(0, 500, (2, 9))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
    batch["labels"][0, :3] = -100
    assert model.eval_forward(batch).shape == (2, 8, 504)
    # Scores where the labels rank anywhere from 1st to far below 10th, so every k is tested.
    out = torch.randn(2, 8, 504)
    rows, cols = (batch["labels"] != -100).nonzero(as_tuple=True)
    out[rows, cols, batch["labels"][rows, cols]] += torch.linspace(0.0, 4.0, len(rows))
    out[0, 5, 500] = out[0, 5, :500].max() + 1.0  # a padded entry above every real one: ignored by top-k
    metrics = model.get_metrics(is_train=False)
    for m in metrics.values():
        model.update_metric(batch, out, m)
    ce = hand_ce(out.detach(), batch["labels"])
    assert metrics["LanguageCrossEntropy"].compute().item() == pytest.approx(ce, rel=1e-5)
    assert metrics["LanguagePerplexity"].compute().item() == pytest.approx(math.exp(ce), rel=1e-5)
    for k in (1, 3, 10):
        expected = hand_topk(out, batch["labels"], k, 500)
        assert 0 < expected < 1, k
        assert metrics[f"Top{k}Accuracy"].compute().item() == pytest.approx(expected, abs=1e-6), k


def test_flops_mambaoutai_reference() -> None:
    # Mambaoutai (D 2688, 28 layers, V 65024, N 16, R 168): ~2.91 GFLOP/token forward, written out by hand.
    D, E, N, R, K, V, n = 2688, 5376, 16, 168, 4, 65024, 28
    per_layer = 4 * D * E + 2 * E * K + 2 * E * (R + 2 * N) + 2 * R * E + 9 * E * N + 2 * E * D
    assert forward_flops_per_token(preset("1.6b"), 4096) == n * per_layer + 2 * D * V
    assert forward_flops_per_token(preset("1.6b"), 4096) / 1e9 == pytest.approx(2.91, abs=0.005)
    model_flops = ComposerMambaLM(preset("debug")).flops_per_batch(
        {"input_ids": torch.zeros(3, 10, dtype=torch.long)}
    )
    assert model_flops == 3 * 3 * 10 * forward_flops_per_token(preset("debug"), 10)


def test_flops_mamba2_and_attention_layers() -> None:
    cfg = preset("debug-hybrid")  # layers 0, 2 Mamba-2; layer 1 attention; gated MLP d_ff 128
    D, E, N, G, H, L = 64, 128, 16, 1, 8, 100
    mamba2 = 2 * D * (2 * E + 2 * G * N + H) + 7 * E * N + 2 * E * D
    heads, hd = 4, 16
    attn = 2 * D * 3 * heads * hd + 4 * heads * hd * L + 2 * heads * hd * D
    mlp = 6 * D * 128
    assert forward_flops_per_token(cfg, L) == 2 * mamba2 + attn + 3 * mlp + 2 * D * 512


def test_non_dict_batch_is_refused() -> None:
    model = ComposerMambaLM(preset("debug"))
    with pytest.raises(ValueError, match="dicts with 'input_ids'"):
        model([torch.zeros(1, 4, dtype=torch.long)])


def test_state_reset_makes_packed_documents_independent() -> None:
    """With reset_state_at_doc_boundaries, a document packed after another gets the logits it gets alone
    (Mamba-2 conv and SSM states, attention, all restart); without it, the first document leaks in."""
    cfg = preset("debug-hybrid")  # Mamba-2, attention with rotary embeddings, MLPs
    model = ComposerMambaLM(cfg, reset_state_at_doc_boundaries=True).eval()
    first, second = torch.randint(0, 500, (1, 11)), torch.randint(0, 500, (1, 21))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(11), torch.arange(21)])[None]
    with torch.no_grad():
        together = model({"input_ids": packed, "position_ids": positions})
        alone = model({"input_ids": second, "position_ids": torch.arange(21)[None]})
        torch.testing.assert_close(together[:, 11:], alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            together[:, :11], model({"input_ids": first, "position_ids": positions[:, :11]})
        )
        model.reset_state_at_doc_boundaries = False
        leaked = model({"input_ids": packed, "position_ids": positions})
    assert (leaked[:, 11:] - alone).abs().max() > 1e-2


def test_state_reset_refuses_mamba1() -> None:
    model = ComposerMambaLM(preset("debug"), reset_state_at_doc_boundaries=True)
    ids = torch.randint(0, 500, (1, 8))
    with pytest.raises(ValueError, match="needs Mamba-2 layers"):
        model({"input_ids": ids, "position_ids": torch.arange(8)[None]})


def test_top_k_in_chunks_equals_a_hand_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows in chunks of 2 (a tiny score budget), padded vocabulary dropped for top-k only, a subset of
    rows: the same as counting by hand whether each label is among the k best real-vocabulary logits."""
    torch.manual_seed(0)
    vocab, padded, n = 12, 16, 11
    logits, labels = torch.randn(n, padded), torch.randint(0, vocab, (n,))
    labels[3] = -100
    logits[:, vocab:] = 100.0  # padding rows would win every top-k if they were ranked
    rows = torch.tensor([0, 2, 3, 5, 6, 9, 10])
    monkeypatch.setattr(composer_model, "TOPK_SCORES_PER_UPDATE", 2 * vocab)
    top3, ce = top_k_accuracy(vocab, 3), LanguageCrossEntropy(ignore_index=-100)
    update_in_chunks([top3, ce], logits, labels, vocab, rows)
    hits = [
        int(labels[r]) in logits[r, :vocab].topk(3).indices.tolist()
        for r in rows.tolist()
        if labels[r] != -100
    ]
    assert float(top3.compute()) == pytest.approx(sum(hits) / len(hits))
    kept = rows[labels[rows] != -100]
    expected_ce = torch.nn.functional.cross_entropy(logits[kept].double(), labels[kept]).item()
    assert float(ce.compute()) == pytest.approx(expected_ce, rel=1e-5)
    everything = top_k_accuracy(vocab, 3)
    update_in_chunks([everything], logits, labels, vocab)  # all rows, as slices
    all_hits = [
        int(labels[r]) in logits[r, :vocab].topk(3).indices.tolist() for r in range(n) if labels[r] != -100
    ]
    assert float(everything.compute()) == pytest.approx(sum(all_hits) / len(all_hits))
