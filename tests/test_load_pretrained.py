"""handover.weights.load_model reads checkpoints as HF transformers and mamba_ssm write them (not only as we do).

References: HF's own ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (their ``__init__`` and
``save_pretrained``, logits to 1e-4), and config files written the way mamba_ssm 2.3.1's
``MambaLMHeadModel.save_pretrained`` writes them (``json.dump(config.__dict__, indent=4)`` of its
``MambaConfig`` dataclass: every top-level field, but only the ``ssm_cfg`` / ``attn_cfg`` keys the
author passed) with weight shapes computed by hand from mamba_ssm's modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from handover.hf_mamba import HF_EMBEDDING, OUR_EMBEDDING
from handover.unsupported import UnsupportedCheckpoint
from handover.weights import load_model


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Move init-constant tensors (norms, D, biases) off their init values so parity covers them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


HF_MAMBA1 = {
    "untied-auto-rank": dict(
        vocab_size=96, hidden_size=40, state_size=8, num_hidden_layers=2, tie_word_embeddings=False
    ),
    "tied-bias-eps": dict(
        vocab_size=64,
        hidden_size=32,
        state_size=4,
        num_hidden_layers=3,
        use_bias=True,
        use_conv_bias=False,
        conv_kernel=3,
        time_step_rank=6,
        layer_norm_epsilon=1e-3,
    ),
}


@pytest.mark.parametrize("name", list(HF_MAMBA1))
def test_hf_mamba1_checkpoint_loads_with_hf_logits(name: str, tmp_path: Path) -> None:
    hf = perturb_(MambaForCausalLM(MambaConfig(**HF_MAMBA1[name]))).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), rtol=1e-4, atol=1e-4)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    assert ours.config.dt_rank == hf.config.time_step_rank


HF_MAMBA2 = {
    # HF's Mamba2Config defaults n_groups=8 and tie_word_embeddings=False; here they come from the class.
    "one-group": dict(num_heads=4, head_dim=16, hidden_size=32, n_groups=1),
    # n_groups=2: HF normalises the gated output over all channels at once; eps 1e-3 in that norm too.
    "two-groups-eps": dict(num_heads=4, head_dim=16, hidden_size=32, n_groups=2, layer_norm_epsilon=1e-3),
    # (a tied Mamba2 cannot be saved by HF 4.53's save_pretrained: "shared tensors ... mismatching")
    "bias": dict(num_heads=2, head_dim=32, hidden_size=32, n_groups=1, use_bias=True),
}


@pytest.mark.parametrize("name", list(HF_MAMBA2))
def test_hf_mamba2_checkpoint_loads_with_hf_logits(name: str, tmp_path: Path) -> None:
    cfg = Mamba2Config(vocab_size=80, state_size=8, num_hidden_layers=2, chunk_size=8, **HF_MAMBA2[name])
    hf = perturb_(Mamba2ForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 80, (2, 21))  # not a multiple of chunk_size
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_logits(hf, ids), rtol=1e-4, atol=1e-4)
    assert ours.config.ssm.gated_norm_eps == cfg.layer_norm_epsilon


@pytest.mark.parametrize(
    ("field", "value"),
    [("time_step_limit", [0.0, 0.1]), ("hidden_act", "gelu"), ("expand", 1.5)],
)
def test_hf_settings_that_change_the_numbers_are_refused(tmp_path: Path, field: str, value: object) -> None:
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=80, num_heads=4, head_dim=16, hidden_size=32, n_groups=1))
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw[field] = value
    if field == "expand":
        raw["num_heads"] = 3  # keep HF's own check (hidden * expand == heads * head_dim) satisfied
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedCheckpoint, match=field):
        load_model(tmp_path / "hf")


# ----------------------------------------------------------------------------------------------
# mamba_ssm's format


def mamba_ssm_config(**fields: object) -> dict:
    """``MambaConfig.__dict__`` of mamba_ssm 2.3.1 (config_mamba.py): all top-level fields."""
    config = {
        "d_model": 2560,
        "d_intermediate": 0,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    assert set(fields) <= set(config)
    return {**config, **fields}


def write_mamba_ssm(path: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=4)  # save_pretrained's call; it writes inf as Infinity
    torch.save(weights, path / "pytorch_model.bin")
    return path


def test_mamba_ssm_mamba2_defaults_are_mamba2s(tmp_path: Path) -> None:
    """ssm_cfg {"layer": "Mamba2"} alone: d_state 128, headdim 64 (mamba2.py), not Mamba-1's d_state 16."""
    D, V = 64, 50
    E, N, H = 2 * D, 128, 2 * D // 64  # expand 2, d_state 128, headdim 64 -> 2 heads
    conv = E + 2 * N
    layer = {
        "norm.weight": torch.rand(D),
        "mixer.in_proj.weight": torch.randn(2 * E + 2 * N + H, D) * 0.05,
        "mixer.conv1d.weight": torch.randn(conv, 1, 4) * 0.3,
        "mixer.conv1d.bias": torch.randn(conv) * 0.1,
        "mixer.dt_bias": torch.randn(H),
        "mixer.A_log": torch.rand(H),
        "mixer.D": torch.randn(H),
        "mixer.norm.weight": torch.rand(E),
        "mixer.out_proj.weight": torch.randn(D, E) * 0.05,
    }
    weights = {f"backbone.layers.0.{k}": v for k, v in layer.items()}
    embedding = torch.randn(56, D)  # vocab 50 padded to a multiple of 8
    weights |= {"backbone.embedding.weight": embedding, "backbone.norm_f.weight": torch.rand(D)}
    weights["lm_head.weight"] = embedding  # tied: the same tensor under two names, as torch.save keeps it
    cfg = mamba_ssm_config(d_model=D, n_layer=1, vocab_size=V, ssm_cfg={"layer": "Mamba2"})
    model = load_model(write_mamba_ssm(tmp_path / "ms", cfg, weights))
    s = model.config.ssm
    assert (s.d_state, s.headdim, s.expand, s.ngroups, s.chunk_size) == (128, 64, 2, 1, 256)
    # The same weights in HF's Mamba2 (an independent implementation) give the same logits.
    hf = Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=56,
            hidden_size=D,
            state_size=N,
            num_heads=H,
            head_dim=64,
            n_groups=1,
            num_hidden_layers=1,
            tie_word_embeddings=True,
        )
    ).eval()
    hf_sd = {(HF_EMBEDDING if k == OUR_EMBEDDING else k): v for k, v in weights.items()}
    hf.load_state_dict(hf_sd)
    ids = torch.randint(0, V, (1, 300))  # longer than one 256-token chunk
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_mamba_ssm_mamba1_defaults_and_auto_dt_rank(tmp_path: Path) -> None:
    D = 40
    E, N, R = 2 * D, 16, math.ceil(D / 16)  # Mamba-1: expand 2, d_state 16, dt_rank "auto"
    hf = perturb_(
        MambaForCausalLM(
            MambaConfig(
                vocab_size=48, hidden_size=D, state_size=N, num_hidden_layers=2, tie_word_embeddings=False
            )
        )
    ).eval()
    weights = {(OUR_EMBEDDING if k == HF_EMBEDDING else k): v for k, v in hf.state_dict().items()}
    assert weights["backbone.layers.0.mixer.x_proj.weight"].shape == (R + 2 * N, E)
    cfg = mamba_ssm_config(
        d_model=D, n_layer=2, vocab_size=48, tie_embeddings=False, ssm_cfg={"dt_rank": "auto"}
    )
    model = load_model(write_mamba_ssm(tmp_path / "ms", cfg, weights))
    assert model.config.dt_rank == R and model.config.ssm.layer == "mamba1"
    ids = torch.randint(0, 48, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def hybrid_weights(attn_cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A 2-layer hybrid (Mamba-2 then attention, MLPs) with shapes from mamba_ssm's modules."""
    from models.config import AttnConfig, SSMConfig
    from models.config import MambaConfig as OurConfig
    from models.mamba_lm import MambaLMHeadModel

    ours = OurConfig(
        d_model=32,
        n_layer=2,
        vocab_size=40,
        d_intermediate=64,
        attn_layer_idx=[1],
        attn=AttnConfig(num_heads=4, num_heads_kv=2, rotary_emb_dim=8),
        ssm=SSMConfig(layer="mamba2", d_state=128, headdim=16),
    )
    weights = MambaLMHeadModel(ours).state_dict()
    # mamba_ssm's GatedMLP: hidden = d_intermediate rounded up to 128; MHA in_proj (4 + 2 * 2) * 8.
    assert weights["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 32)
    assert weights["backbone.layers.1.mixer.in_proj.weight"].shape == ((4 + 2 * 2) * 8, 32)
    config = mamba_ssm_config(
        d_model=32,
        n_layer=2,
        vocab_size=40,
        d_intermediate=64,
        ssm_cfg={"layer": "Mamba2", "headdim": 16},
        attn_layer_idx=[1],
        attn_cfg=attn_cfg,
        tie_embeddings=False,
    )
    return config, weights


# The keys mamba_ssm's MHA takes, as a hybrid's config.json spells them (d_conv 0: no conv).
MHA_CFG = {
    "causal": True,
    "d_conv": 0,
    "head_dim": 8,
    "num_heads": 4,
    "num_heads_kv": 2,
    "out_proj_bias": True,
    "qkv_proj_bias": True,
    "rotary_emb_dim": 8,
    "rotary_emb_base": 10000.0,
    "rotary_emb_interleaved": False,
    "softmax_scale": None,
    "mlp_dim": 0,
}


def test_mamba_ssm_hybrid_with_mha_keys_loads(tmp_path: Path) -> None:
    config, weights = hybrid_weights(MHA_CFG)
    model = load_model(write_mamba_ssm(tmp_path / "ms", config, weights))
    assert model.config.attn_layer_idx == [1] and model.config.attn.num_heads_kv == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"d_conv": 4}, "attn_cfg.d_conv"),
        ({"causal": False}, "attn_cfg.causal"),
        ({"rotary_emb_interleaved": True}, "attn_cfg.rotary_emb_interleaved"),
        ({"mlp_dim": 256}, "attn_cfg.mlp_dim"),
        ({"window": 4}, "attn_cfg"),
    ],
)
def test_mamba_ssm_attention_settings_we_cannot_represent_are_refused(
    tmp_path: Path, change: dict, named: str
) -> None:
    config, weights = hybrid_weights({**MHA_CFG, **change})
    with pytest.raises(UnsupportedCheckpoint, match=named):
        load_model(write_mamba_ssm(tmp_path / "ms", config, weights))


@pytest.mark.parametrize(
    ("ssm_cfg", "named"),
    [
        ({"layer": "Mamba2", "dt_limit": [0.0, 0.2]}, "ssm_cfg.dt_limit"),
        ({"layer": "Mamba2", "norm_before_gate": True}, "ssm_cfg.norm_before_gate"),
        ({"layer": "Mamba2", "D_has_hdim": True}, "ssm_cfg.D_has_hdim"),
        ({"layer": "Mamba1", "headdim": 32}, "headdim"),  # Mamba-1 takes no headdim: mamba_ssm fails too
        ({"layer": "Mamba3"}, "ssm_cfg.layer"),
    ],
)
def test_mamba_ssm_ssm_settings_we_cannot_represent_are_refused(
    tmp_path: Path, ssm_cfg: dict, named: str
) -> None:
    config = mamba_ssm_config(d_model=32, n_layer=1, vocab_size=40, ssm_cfg=ssm_cfg)
    with pytest.raises(UnsupportedCheckpoint, match=named):
        load_model(write_mamba_ssm(tmp_path / "ms", config, {}))


def test_mamba_ssm_dt_limit_default_written_as_infinity_loads(tmp_path: Path) -> None:
    from models.config import MambaConfig as OurConfig
    from models.config import SSMConfig
    from models.mamba_lm import MambaLMHeadModel

    weights = MambaLMHeadModel(
        OurConfig(
            d_model=32, n_layer=1, vocab_size=40, ssm=SSMConfig(layer="mamba2", d_state=128, headdim=16)
        )
    ).state_dict()
    config = mamba_ssm_config(
        d_model=32,
        n_layer=1,
        vocab_size=40,
        ssm_cfg={
            "layer": "Mamba2",
            "headdim": 16,
            "dt_limit": [0.0, float("inf")],
            "use_mem_eff_path": False,
        },
    )
    path = write_mamba_ssm(tmp_path / "ms", config, weights)
    assert "Infinity" in (path / "config.json").read_text()
    assert load_model(path).config.ssm.d_state == 128
