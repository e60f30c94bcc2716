"""Validation metrics overall and by position in the document.

Positional loss weighting (the paper's section 4.2) trades the first positions of each
document for the later ones, so its effect only shows when metrics are split by position.
The position of a prediction is the position of its *input* token in its document
(``position_ids``, restarting after each end-of-text, as in training: the loss term at ``t``
is weighted by ``w(position_ids[:, t])``).

Each group (all tokens, then each position bucket) gets Composer's ``LanguageCrossEntropy``
(over the full, padded-vocabulary logits, like the training loss) and torchmetrics'
``MulticlassAccuracy(top_k=k, ignore_index=-100, average="micro")`` (over the real vocabulary),
the same metrics the Trainer logs. Perplexity is exp(cross-entropy).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
from composer.metrics.nlp import LanguageCrossEntropy
from torch import Tensor

from models.composer_model import IGNORE_INDEX, top_k_accuracy, update_in_chunks

# Bucket starts: 0-15, 16-63, 64-255, 256-1023, 1024+ (the split; tanh(p / 10) is
# above 0.9 from p = 15 on, so the first bucket holds nearly all the down-weighted positions).
DEFAULT_BUCKETS = (0, 16, 64, 256, 1024)
TOP_K = (1, 3, 10)
ALL = "all"


def bucket_names(starts: Sequence[int]) -> list[str]:
    """Labels of buckets that start at ``starts``: [0, 16, 64] -> ['0-15', '16-63', '64+']."""
    if not starts or starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"position buckets {list(starts)} must start at 0 and increase strictly")
    names = [f"{a}-{b - 1}" for a, b in itertools.pairwise(starts)]
    return [*names, f"{starts[-1]}+"]


def parse_buckets(text: str) -> tuple[int, ...]:
    """``"0,16,64,256,1024"`` -> (0, 16, 64, 256, 1024), checked."""
    try:
        starts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ValueError(
            f"--buckets {text!r}: give comma-separated integers such as 0,16,64,256,1024"
        ) from exc
    bucket_names(starts)
    return starts


class PositionMetrics:
    """Cross-entropy, perplexity and top-k accuracy for all tokens and per position bucket."""

    def __init__(
        self,
        vocab_size: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        top_k: Sequence[int] = TOP_K,
        device: torch.device | str = "cpu",
    ) -> None:
        self.vocab_size = vocab_size
        self.starts = torch.tensor(list(buckets), device=device)
        self.names = bucket_names(buckets)
        self.top_k = tuple(top_k)
        self.groups = {name: self._group(device) for name in [ALL, *self.names]}
        self.tokens = dict.fromkeys(self.groups, 0)

    def _group(self, device: torch.device | str) -> dict[str, torch.nn.Module]:
        group: dict[str, torch.nn.Module] = {"ce": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}
        for k in self.top_k:
            group[f"top{k}"] = top_k_accuracy(self.vocab_size, k)
        return {name: metric.to(device) for name, metric in group.items()}

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, position_ids: Tensor) -> None:
        """logits (b, l, V_padded), labels (b, l) with -100 = ignore, position_ids (b, l)."""
        logits = logits.reshape(-1, logits.shape[-1]).float()
        labels, positions = labels.reshape(-1), position_ids.reshape(-1)
        valid = labels != IGNORE_INDEX
        bucket = torch.bucketize(positions, self.starts, right=True) - 1  # index into self.names
        # Only the buckets are scored; "all" merges their states in compute() (the buckets
        # partition the tokens), which halves the top-k work.
        selections = {name: valid & (bucket == i) for i, name in enumerate(self.names)}
        for name, mask in selections.items():
            rows = mask.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            self.tokens[name] += int(rows.numel())
            update_in_chunks(self.groups[name].values(), logits, labels, self.vocab_size, rows)

    def compute(self) -> dict[str, dict[str, float | None]]:
        """{group: {tokens, cross_entropy, perplexity, top1, top3, top10}}; an empty group gets None."""
        everything = self.groups[ALL]
        for metric_name, metric in everything.items():
            metric.reset()
            for bucket in self.names:
                metric.merge_state(self.groups[bucket][metric_name])
        self.tokens[ALL] = sum(self.tokens[bucket] for bucket in self.names)
        out: dict[str, dict[str, float | None]] = {}
        for name, group in self.groups.items():
            row: dict[str, float | None] = {"tokens": self.tokens[name]}
            if self.tokens[name] == 0:
                row.update(cross_entropy=None, perplexity=None)
                row.update({f"top{k}": None for k in self.top_k})
            else:
                with warnings.catch_warnings():
                    # "all" holds merged states but no update() call, which torchmetrics warns about.
                    warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
                    ce = float(group["ce"].compute())
                    row.update(cross_entropy=ce, perplexity=math.exp(ce))
                    row.update({f"top{k}": float(group[f"top{k}"].compute()) for k in self.top_k})
            out[name] = row
        return out


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict[str, dict[str, float | None]], top_k: Sequence[int] = TOP_K) -> str:
    """A console table: one row per group (all, then each bucket); '-' for a bucket without tokens."""
    header = ["positions", "tokens", "CE", "ppl", *(f"top{k}" for k in top_k)]
    rows = [header]
    for name, r in results.items():
        rows.append([
            name,
            f"{int(r['tokens'] or 0)}",
            _cell(r["cross_entropy"], 4),
            _cell(r["perplexity"], 2),
            *(_cell(r[f"top{k}"], 4) for k in top_k),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
