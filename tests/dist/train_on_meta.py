"""recipes/train.py with the model built on the meta device, as it is under FSDP on GPUs.

Run by tests/test_handover_dist.py as ``composer -n 2 tests/dist/train_on_meta.py RECIPE key=value ...``.
On a CPU ``recipes.train.build_model`` never uses the meta device; this script makes it, so the
GPU path of ``init_from`` runs here: rank 0 materialises and loads the weights, the other ranks
stay on meta, and Composer's FSDP2 broadcasts rank 0's weights while sharding.
"""

from __future__ import annotations

import sys

import torch

import recipes.train as train
from models.composer_model import ComposerMambaLM
from models.mamba_lm import MambaLMHeadModel


def build_on_meta(cfg, fsdp: bool) -> ComposerMambaLM:
    # Only the network on meta: the wrapper's torchmetrics states must stay real tensors (Composer
    # moves them with .to(), which a meta tensor refuses).
    with torch.device("meta"):
        network = MambaLMHeadModel(cfg.model)
    return ComposerMambaLM(cfg.model, network, reset_state_at_doc_boundaries=cfg.reset_state_at_doc_boundaries)


if __name__ == "__main__":
    train.build_model = build_on_meta
    train.main(sys.argv[1:])
