"""Every recipe does what its header says: the settings each header states, against the resolved config.

The expected values are copied from the recipes' header comments (and, for the paper's recipes, from
"Passing the Torch"), not from the YAML bodies, so a recipe whose body drifts from its header fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.config import TrainConfig, load_train_config, resolved_dict

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_KEYS = ("scheduler", "algorithms", "callbacks", "loggers")
ON = object()  # the part is switched on (with whatever arguments)

# The paper's 0.5B ablation (section 4): 10B tokens, peak lr 2e-3, AdamW 0.9/0.95, wd 0.1, clip 1.0,
# 480 warmup steps (on its 64 GPUs under the ramp: 480 x 1M = 503,316,480 tokens, the recipes' warmup),
# constant for 80% of training then linear to 2e-4, batch 2M tokens (512 x 4096) ramped over the
# first 1B tokens, loss-spike rollback (ours).
ABLATION = {
    "model_preset": "0.5b",
    "max_duration": "10000000000tok",
    "optimizer.lr": 2e-3,
    "optimizer.beta1": 0.9,
    "optimizer.beta2": 0.95,
    "optimizer.weight_decay": 0.1,
    "algorithms.gradient_clipping.clipping_threshold": 1.0,
    "global_train_batch_size": 512,
    "batch_rampup.ramp_tokens": 1_000_000_000,
    "callbacks.loss_spike": ON,
}
WSD_ABLATION = {
    **ABLATION,
    "scheduler.name": "wsd",
    "scheduler.t_warmup": "503316480tok",
    "scheduler.t_decay": 0.2,
    "scheduler.decay_shape": "linear",
    "scheduler.alpha_f": 0.1,
}
# Falcon-Mamba-7B (TII model cards; arXiv:2410.05355): d_model 4096, 64 layers, d_state 16, vocab 65024,
# untied, dt/B/C RMS norms (eps 1e-6); AdamW wd 0.1, max lr 6.4e-4, exponential decay to lr/256;
# batch 2048 x 8192. Our decay: 50B tokens, weights only with a 200-batch re-warmup.
FALCON_MAMBA_DECAY = {
    "model.d_model": 4096,
    "model.n_layer": 64,
    "model.vocab_size": 65024,
    "model.tie_embeddings": False,
    "model.ssm.d_state": 16,
    "model.ssm.b_c_dt_rms": True,
    "model.ssm.b_c_dt_rms_eps": 1e-6,
    "optimizer.lr": 6.4e-4,
    "optimizer.weight_decay": 0.1,
    "global_train_batch_size": 2048,
    "max_duration": "50000000000tok",
    "scheduler.name": "decay_phase",
    "scheduler.decay_shape": "exponential",
    "scheduler.alpha_f": 1 / 256,
    "data.phase": "decay",
}
MAMBA2 = {
    "model.ssm.layer": "mamba2",
    "model.ssm.d_state": 128,
    "model.ssm.headdim": 64,
    "model.ssm.chunk_size": 256,
}
# Mambaoutai 1.6B (section 3): d_model 2688, 28 layers, 64k vocabulary, untied head, batch 896 x 4096,
# lr 4.5e-4, AdamW (0.9, 0.95), wd 0.1, clip 1.0, 2000 warmup steps, WSD over 300B tokens, 30B-token decay.
MAMBAOUTAI = {
    "model.d_model": 2688,
    "model.n_layer": 28,
    "model.vocab_size": 65024,
    "model.tie_embeddings": False,
    "global_train_batch_size": 896,
    "optimizer.lr": 4.5e-4,
    "optimizer.beta1": 0.9,
    "optimizer.beta2": 0.95,
    "optimizer.weight_decay": 0.1,
    "algorithms.gradient_clipping.clipping_threshold": 1.0,
}
DECAY = {
    "scheduler.name": "decay_phase",
    "scheduler.t_start": "0ba",
    "checkpoint.load_ignore_keys": [
        "state/timestamp",
        "state/dataset_state",
        "state/schedulers",
        "state/callbacks",
    ],
    "checkpoint.pre_decay": False,
}
TINY_WSD = {  # "the same recipe (WSD, 80% stable, linear decay to 0.1 of the peak)"
    "scheduler.name": "wsd",
    "scheduler.t_decay": 0.2,
    "scheduler.decay_shape": "linear",
    "scheduler.alpha_f": 0.1,
    "algorithms.gradient_clipping.clipping_threshold": 1.0,
}

STUDY = {**TINY_WSD, "data.mixture": "yamls/data/demo.yaml", "optimizer.lr": 3.0e-3, "model.d_model": 128}

STATED: dict[str, dict[str, object]] = {
    "ablation_wsd.yaml": WSD_ABLATION,
    "ablation_wsd_posweight.yaml": {
        **WSD_ABLATION,
        "algorithms.positional_weighting.scale": 10.0,
        "algorithms.positional_weighting.per_document": True,
        "algorithms.positional_weighting.fn": "tanh",
    },
    "ablation_cosine.yaml": {
        **ABLATION,
        "scheduler.name": "cosine",
        "scheduler.t_warmup": "503316480tok",  # 480 steps under the ramp on 64 GPUs
        "scheduler.alpha_f": 0.1,
        "checkpoint.pre_decay": False,
    },
    "ablation_d2z.yaml": {
        **ABLATION,
        "scheduler.name": "linear_with_warmup",
        "scheduler.t_warmup": "503316480tok",
        "scheduler.alpha_f": 0.0,
    },
    "ablation_mamba2.yaml": {**WSD_ABLATION, **MAMBA2},
    "ablation_hybrid.yaml": {
        **WSD_ABLATION,
        **MAMBA2,
        "model.n_layer": 24,
        "model.d_intermediate": 2816,
        "model.attn_layer_idx": [6, 17],
        "model.attn.rotary_emb_dim": 0,
    },
    "mambaoutai_1.6b.yaml": {
        **MAMBAOUTAI,
        "max_duration": "300000000000tok",
        "scheduler.name": "wsd",
        "scheduler.t_warmup": "2000ba",
        "scheduler.t_decay": "30000000000tok",
        "scheduler.decay_shape": "linear",
        "checkpoint.pre_decay": True,
    },
    "decay/mambaoutai_instruct.yaml": {
        **MAMBAOUTAI,
        **DECAY,
        "max_duration": "30000000000tok",
        "data.phase": "decay",
        "scheduler.decay_shape": "linear",
    },
    "decay/mambaoutai_base.yaml": {
        **MAMBAOUTAI,
        **DECAY,
        "max_duration": "30000000000tok",
        "data.phase": "stable",
        "scheduler.decay_shape": "linear",
    },
    "decay/cooldown_1sqrt.yaml": {
        **DECAY,
        "model_preset": "0.5b",
        "data.phase": "decay",
        "scheduler.decay_shape": "1-sqrt",
        "scheduler.alpha_f": 0.0,
        "batch_rampup": None,
    },
    "continue/mambaoutai_stable.yaml": {
        **MAMBAOUTAI,
        "init_from.path": "checkpoints/mambaoutai",
        "init_from.lr_rewarmup": "200ba",
        "max_duration": "50000000000tok",
        "scheduler.name": "wsd",
        "scheduler.t_decay": "5000000000tok",  # the pre-decay checkpoint at 45B of 50B
    },
    "decay/mambaoutai_from_hf.yaml": {
        **MAMBAOUTAI,
        **DECAY,
        "checkpoint.load_ignore_keys": [],
        "init_from.path": "checkpoints/mambaoutai",
        "init_from.lr_rewarmup": "200ba",
        "data.phase": "decay",
        "max_duration": "30000000000tok",
        "scheduler.decay_shape": "linear",
        "scheduler.alpha_f": 0.1,
    },
    "tiny/continue_hf.yaml": {  # "at the stable peak lr": a warmup-free WSD
        "scheduler.name": "wsd",
        "scheduler.t_warmup": "0ba",
        "init_from.path": "runs/demo/hf-stable",
        "init_from.lr_rewarmup": "20ba",
        "max_duration": "60ba",
    },
    "tiny/decay_hf.yaml": {
        **DECAY,
        "checkpoint.load_ignore_keys": [],
        "init_from.path": "runs/demo/hf-pre-decay",
        "data.phase": "decay",
    },
    "tiny/inheritune_reference.yaml": {**TINY_WSD, "model.n_layer": 4, "max_duration": "80ba"},
    "tiny/inheritune.yaml": {**TINY_WSD, "max_duration": "20ba"},
    "tiny/wsd.yaml": {**TINY_WSD, "data.mixture": "yamls/data/demo.yaml"},
    "tiny/wsd_posweight.yaml": {**TINY_WSD, "algorithms.positional_weighting.scale": 10.0},
    "tiny/long_wsd.yaml": {  # "long documents at sequence 2048", "d_model 96, 3 layers"
        **TINY_WSD,
        "data.mixture": "yamls/data/long_docs.yaml",
        "model.d_model": 96,
        "model.n_layer": 3,
    },
    "tiny/long_wsd_posweight.yaml": {
        **TINY_WSD,
        "data.mixture": "yamls/data/long_docs.yaml",
        "algorithms.positional_weighting.scale": 10.0,
        "algorithms.positional_weighting.per_document": True,
    },
    "tiny/cosine.yaml": {"scheduler.name": "cosine", "scheduler.alpha_f": 0.1},
    "tiny/d2z.yaml": {"scheduler.name": "linear_with_warmup", "scheduler.alpha_f": 0.0},
    "tiny/mamba2.yaml": {**TINY_WSD, "model.ssm.layer": "mamba2"},
    "tiny/hybrid.yaml": {**TINY_WSD, "model.ssm.layer": "mamba2", "model.attn_layer_idx": [2]},
    "tiny/decay.yaml": {**DECAY, "data.phase": "decay", "max_duration": "40ba", "scheduler.alpha_f": 0.1},
    "tiny/demo.yaml": {**TINY_WSD, "algorithms.positional_weighting.scale": 10.0, "max_duration": "270ba"},
    "tiny/needle_mamba.yaml": {
        **TINY_WSD,
        "model.d_model": 128,
        "model.n_layer": 4,
        "model.attn_layer_idx": [],
        "data.mixture": "yamls/data/needle.yaml",
        "max_duration": "3000ba",
        "global_train_batch_size": 8,
        "optimizer.lr": 6.0e-3,
    },
    "tiny/needle_mamba2.yaml": {  # "needle_mamba.yaml with Mamba-2 (SSD) mixers"
        **TINY_WSD,
        "model.d_model": 128,
        "model.n_layer": 4,
        "model.ssm.layer": "mamba2",
        "model.ssm.d_state": 32,
        "data.mixture": "yamls/data/needle.yaml",
        "max_duration": "3000ba",
        "global_train_batch_size": 8,
        "optimizer.lr": 6.0e-3,
    },
    "tiny/needle_attention.yaml": {  # "every layer attention, rotary positions on the whole head"
        **TINY_WSD,
        "model.d_model": 128,
        "model.n_layer": 4,
        "model.attn_layer_idx": [0, 1, 2, 3],
        "model.attn.rotary_emb_dim": 32,  # d_model 128 / 4 heads
        "model.attn.num_heads": 4,
        "model.d_intermediate": 128,
        "data.mixture": "yamls/data/needle.yaml",
        "max_duration": "3000ba",
        "global_train_batch_size": 8,
        "optimizer.lr": 2.0e-3,  # "its own peak lr, 2e-3"
    },
    # make hybrid-tiny: "the tiny WSD at lr 3e-3" on "the demo corpus", d_model 128 each.
    "tiny/study_mamba2.yaml": {  # "deepened to 11 layers, no MLP"
        **STUDY,
        "model.ssm.layer": "mamba2",
        "model.ssm.d_state": 32,
        "model.ssm.headdim": 32,
        "model.n_layer": 11,
        "model.attn_layer_idx": [],
        "model.d_intermediate": 0,
    },
    "tiny/study_hybrid.yaml": {  # "block 3 with attention (4 heads)", "a gated MLP of 256", "no position embedding"
        **STUDY,
        "model.ssm.layer": "mamba2",
        "model.n_layer": 6,
        "model.attn_layer_idx": [3],
        "model.attn.num_heads": 4,
        "model.attn.rotary_emb_dim": 0,
        "model.d_intermediate": 256,
    },
    "tiny/study_attention.yaml": {  # "7 blocks", "rotary positions on the whole head", "a gated MLP of 256"
        **STUDY,
        "model.n_layer": 7,
        "model.attn_layer_idx": [0, 1, 2, 3, 4, 5, 6],
        "model.attn.num_heads": 4,
        "model.attn.rotary_emb_dim": 32,
        "model.d_intermediate": 256,
    },
    "tiny/needle_hybrid.yaml": {  # "3 blocks - Mamba-2, attention (4 heads, no position embedding), Mamba-2"
        **TINY_WSD,
        "model.d_model": 128,
        "model.n_layer": 3,
        "model.ssm.layer": "mamba2",
        "model.attn_layer_idx": [1],
        "model.attn.num_heads": 4,
        "model.attn.rotary_emb_dim": 0,
        "model.d_intermediate": 128,
        "data.mixture": "yamls/data/needle.yaml",
        "max_duration": "3000ba",
        "global_train_batch_size": 8,
        "optimizer.lr": 6.0e-3,
    },
    "tiny/demo_decay.yaml": {**DECAY, "data.phase": "decay", "algorithms.positional_weighting.scale": 10.0},
    "decay/falcon_mamba_7b.yaml": FALCON_MAMBA_DECAY,
    "tiny/bamba_decay.yaml": {  # "attention at layers 1 and 3 with half-rotary GQA, a gated MLP after every layer"
        "model.ssm.layer": "mamba2",
        "model.attn_layer_idx": [1, 3],
        "model.attn.num_heads_kv": 2,
        "model.attn.rotary_emb_dim": 8,
        "model.d_intermediate": 128,
        "model.residual_in_fp32": False,
        "max_duration": "20ba",
        "data.phase": "decay",
    },
    "tiny/falcon_mamba_decay.yaml": {
        **{k: v for k, v in FALCON_MAMBA_DECAY.items() if not k.startswith(("model.", "global_", "max_"))},
        "model.ssm.b_c_dt_rms": True,
        "max_duration": "20ba",
    },
}


def resolved(cfg: TrainConfig, key: str) -> object:
    """The value at ``key``; registered parts with their constructor defaults filled in."""
    node: object = resolved_dict(cfg) if key.split(".")[0] in REGISTRY_KEYS else cfg
    for part in key.split("."):
        if isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


def test_every_recipe_is_listed() -> None:
    shipped = sorted(
        str(p.relative_to(ROOT / "yamls"))
        for p in (ROOT / "yamls").rglob("*.yaml")
        if p.parent.name != "data"
    )
    assert sorted(STATED) == shipped


@pytest.mark.parametrize("recipe", sorted(STATED))
def test_recipe_does_what_its_header_says(recipe: str) -> None:
    cfg = load_train_config([ROOT / "yamls" / recipe])
    text = (ROOT / "yamls" / recipe).read_text()
    assert text.lstrip().startswith(("#", "base:")), "a recipe opens with its header"
    for key, want in STATED[recipe].items():
        got = resolved(cfg, key)
        if want is ON:
            assert isinstance(got, dict), f"{recipe}: {key} is off, its header says it is on"
            continue
        assert got == want, f"{recipe}: {key} is {got!r}, its header says {want!r}"
