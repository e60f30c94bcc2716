"""make hybrid-tiny compares like with like: the three models of yamls/tiny/study_*.yaml are equal in size
(non-embedding parameters within 5%, counted on the built networks), the hybrid has the empirical study's
layer mix, and the recipes differ in nothing but the model (same data, schedule, batches and tokens)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig, load_train_config, resolved_dict

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("mamba2", "hybrid", "attention")


def config(variant: str) -> TrainConfig:
    return load_train_config([ROOT / "yamls" / "tiny" / f"study_{variant}.yaml"])


def non_embedding_parameters(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        network = MambaLMHeadModel(cfg.model)
    return sum(
        p.numel()
        for name, p in network.named_parameters()
        if not name.startswith(("backbone.embedding", "lm_head"))
    )


def test_the_three_models_are_equal_in_size() -> None:
    sizes = {v: non_embedding_parameters(config(v)) for v in VARIANTS}
    # By hand at d_model 128: a Mamba-2 layer (d_inner 256, d_state 32, 8 heads) in_proj 128 x 584,
    # conv 320 x 4 + 320, dt_bias/A_log/D 3 x 8, gated norm 256, out_proj 256 x 128, block norm 128:
    # 109,528; an attention layer (4 heads of 32) qkv 128 x 384 + 384, out 128 x 128 + 128, norm 128:
    # 66,176; a gated MLP of 256: 128 x 512 + 256 x 128, norm 128: 98,432; the final norm 128.
    mamba2, attention, mlp = 109_528, 66_176, 98_432
    assert sizes["mamba2"] == 11 * mamba2 + 128
    assert sizes["hybrid"] == 5 * mamba2 + attention + 6 * mlp + 128
    assert sizes["attention"] == 7 * (attention + mlp) + 128
    assert max(sizes.values()) / min(sizes.values()) - 1 < 0.05, sizes


def test_the_hybrid_has_the_studys_layer_mix() -> None:
    """The study's Mamba-2-Hybrid: 43% Mamba-2, 7% attention, 50% MLP layers; here 5, 1 and 6 of 12."""
    model = config("hybrid").model
    attention = len(model.attn_layer_idx)
    mlps = model.n_layer if model.d_intermediate > 0 else 0
    layers = model.n_layer + mlps
    assert (model.n_layer - attention, attention, mlps) == (5, 1, 6)
    assert abs(attention / layers - 0.07) < 0.02 and abs(mlps / layers - 0.50) < 0.01
    assert model.ssm.layer == "mamba2"
    assert config("mamba2").model.attn_layer_idx == [] and config("mamba2").model.d_intermediate == 0
    assert config("attention").model.attn_layer_idx == list(range(config("attention").model.n_layer))


def test_the_recipes_differ_only_in_the_model() -> None:
    resolved = {v: resolved_dict(config(v)) for v in VARIANTS}
    for v in VARIANTS:
        assert resolved[v].pop("run_name") == v
        resolved[v].pop("model")
        resolved[v].pop("base")  # mamba2.yaml or wsd.yaml: tiny/mamba2.yaml changes only the model
    assert resolved["hybrid"] == resolved["mamba2"] == resolved["attention"]


def test_the_needle_hybrid_is_the_size_of_the_needle_mamba2() -> None:
    """yamls/tiny/needle_hybrid.yaml against needle_mamba2.yaml: within 5% besides the embeddings."""
    load = lambda name: load_train_config([ROOT / "yamls" / "tiny" / f"needle_{name}.yaml"])  # noqa: E731
    hybrid, mamba2 = non_embedding_parameters(load("hybrid")), non_embedding_parameters(load("mamba2"))
    # By hand (see above): 2 Mamba-2 layers, 1 attention, 3 gated MLPs of 128 (128 x 256 + 128 x 128 + 128).
    assert hybrid == 2 * 109_528 + 66_176 + 3 * 49_280 + 128
    assert mamba2 == 4 * 109_528 + 128
    assert abs(hybrid / mamba2 - 1) < 0.05
