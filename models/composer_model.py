"""The Composer wrapper: dict batches in, loss and metrics out, FSDP/activation-checkpointing hooks.

Batches are dicts (Composer on CPU turns NamedTuples into lists): ``input_ids`` (b, l),
``labels`` (b, l) already shifted (labels[:, t] is the token after input t; -100 = ignore),
``position_ids`` (b, l) (index in its document, used to restart the state at document
boundaries when asked), and optionally ``loss_weights`` (b, l), per-token loss weights that
the positional-weighting algorithm (callbacks/positional_weighting.py) adds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from models.config import MambaConfig
from models.flops import training_flops_per_token
from models.mamba_lm import MambaLMHeadModel

IGNORE_INDEX = -100
TOPK_SCORES_PER_UPDATE = 1 << 24  # bounds torchmetrics' one-hot top-k tensors (rows x vocab)


def lm_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy over labels != -100, computed in float32 (even for bf16 logits).

    With ``weights`` (b, l): sum(w * ce) / sum(w) over the valid tokens, a weighted mean that
    stays on the scale of the plain one (positional loss weighting, the paper's section 4.2).
    A batch whose valid weights sum to 0 gives 0 with zero gradients, not NaN.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"loss: logits must be (b, l, V) and labels (b, l); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"loss: loss_weights {tuple(weights.shape)} must have the labels' shape {tuple(labels.shape)}"
        )
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(labels)
    valid = labels != IGNORE_INDEX
    w = valid.float() if weights is None else torch.where(valid, weights.float(), 0.0)
    return (w * ce).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def top_k_accuracy(vocab_size: int, k: int) -> MulticlassAccuracy:
    """torchmetrics' micro-averaged top-k accuracy over the real vocabulary (padding rows of the
    head are never a label): the fraction of valid tokens whose label is among the k best."""
    return MulticlassAccuracy(num_classes=vocab_size, top_k=k, ignore_index=IGNORE_INDEX, average="micro")


def update_in_chunks(
    metrics: Iterable[Metric], logits: Tensor, labels: Tensor, vocab_size: int, rows: Tensor | None = None
) -> None:
    """Update ``metrics`` with the ``rows`` (default: all) of logits (N, V_padded) and labels (N,).

    torchmetrics' top-k path builds (rows, vocab) one-hot tensors, so rows go in chunks of about
    ``TOPK_SCORES_PER_UPDATE`` scores. A ``MulticlassAccuracy`` sees the real vocabulary's scores
    (``vocab_size``), any other metric (cross-entropy) the full logits.
    """
    metrics = list(metrics)
    step = max(1, TOPK_SCORES_PER_UPDATE // vocab_size)
    chunks = (
        rows.split(step) if rows is not None else [slice(i, i + step) for i in range(0, len(labels), step)]
    )
    for chunk in chunks:
        chunk_logits, chunk_labels = logits[chunk], labels[chunk]
        for metric in metrics:
            top_k = isinstance(metric, MulticlassAccuracy)
            metric.update(chunk_logits[:, :vocab_size] if top_k else chunk_logits, chunk_labels)


def _metrics(vocab_size: int) -> dict[str, Metric]:
    return {
        "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
        "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        "Top1Accuracy": top_k_accuracy(vocab_size, 1),
        "Top3Accuracy": top_k_accuracy(vocab_size, 3),
        "Top10Accuracy": top_k_accuracy(vocab_size, 10),
    }


class ComposerMambaLM(ComposerModel):
    """``MambaLMHeadModel`` for the Composer Trainer.

    Composer's FSDP (1 and 2) reads ``fsdp_wrap_fn``, ``activation_checkpointing_fn`` and
    ``param_init_fn`` from this module's child ``model``: one unit per block.
    """

    def __init__(
        self,
        cfg: MambaConfig,
        model: MambaLMHeadModel | None = None,
        reset_state_at_doc_boundaries: bool = False,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = model if model is not None else MambaLMHeadModel(cfg)
        # Restart the recurrent state (and attention) at each document of a packed sample, using
        # the batch's position_ids (0 at a document's first token). Off by default, as in the paper.
        self.reset_state_at_doc_boundaries = reset_state_at_doc_boundaries
        # Plain dicts, not ModuleDicts: Composer moves metrics itself, and FSDP2 refuses to
        # wrap a child container without a forward. Training logs the unweighted cross-entropy
        # (beside a positionally weighted loss); evaluation adds perplexity and top-k accuracy.
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}
        self.val_metrics = _metrics(cfg.vocab_size)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("batches must be dicts with 'input_ids' and 'labels' (see data/loader.py)")
        if not self.reset_state_at_doc_boundaries:
            return self.model(batch["input_ids"])
        if "position_ids" not in batch:
            raise ValueError(
                "reset_state_at_doc_boundaries needs 'position_ids' in the batch (data/loader.py emits them)"
            )
        seq_idx = (batch["position_ids"] == 0).cumsum(dim=1)
        return self.model(batch["input_ids"], seq_idx=seq_idx)

    def loss(self, outputs: Tensor, batch: dict[str, Tensor], *args: Any, **kwargs: Any) -> Tensor:
        return lm_cross_entropy(outputs, batch["labels"], batch.get("loss_weights"))

    def eval_forward(self, batch: dict[str, Tensor], outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return dict(self.train_metrics if is_train else self.val_metrics)

    def update_metric(self, batch: dict[str, Tensor], outputs: Tensor, metric: Metric) -> None:
        # Evaluation is always unweighted: loss_weights only shape the training loss.
        labels = batch["labels"].contiguous()
        if isinstance(metric, MulticlassAccuracy):  # torchmetrics wants (N, C) scores: flatten (b, l)
            flat = outputs.reshape(-1, outputs.shape[-1])
            update_in_chunks([metric], flat, labels.reshape(-1), self.config.vocab_size)
        else:
            metric.update(outputs, labels)

    def flops_per_batch(self, batch: dict[str, Tensor]) -> int:
        b, seq_len = batch["input_ids"].shape
        return training_flops_per_token(self.config, seq_len) * b * seq_len


# Parameters kept out of weight decay, by name: SSM dynamics (A_log, D, dt biases: decaying
# them towards 0 changes the recurrence, mamba_ssm tags them _no_weight_decay), norm gains and
# all biases. Matched on names because parameter attributes do not survive meta-device init.
NO_DECAY_SUFFIXES = (".A_log", ".D", ".dt_bias", ".dt_proj.bias", ".bias")
NO_DECAY_MODULE_PARTS = ("norm",)


def decays(name: str) -> bool:
    """Whether parameter ``name`` (e.g. ``backbone.layers.0.mixer.A_log``) gets weight decay."""
    leaf_module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return not (name.endswith(NO_DECAY_SUFFIXES) or any(p in leaf_module for p in NO_DECAY_MODULE_PARTS))


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the rest with weight_decay 0 (names in each group's 'names')."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name) else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay]},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "names": [n for n, _ in no_decay]},
    ]
