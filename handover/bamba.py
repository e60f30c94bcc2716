"""HF transformers' hybrid families: IBM's Bamba in and out, every other one refused by name.

Bamba (HF ``BambaForCausalLM``, ``model_type: bamba``) is the design of this repository's hybrid
model and of the empirical study's Mamba-2-Hybrid: Mamba-2 layers with a few attention layers
(``attn_layer_indices``), each layer followed by a SwiGLU MLP, pre-norm residual blocks, a final
RMSNorm. It maps 1:1 onto ``MambaLMHeadModel`` (read from transformers 4.53's
``modeling_bamba.py``):

======================================  ==============================================
Bamba                                   here (mamba_ssm's names)
======================================  ==============================================
``model.embed_tokens``                  ``backbone.embedding``
``layers.i.input_layernorm``            ``backbone.layers.i.norm``
``layers.i.mamba.*``                    ``backbone.layers.i.mixer.*`` (Mamba2Mixer, same names)
``layers.i.self_attn.{q,k,v}_proj``     ``backbone.layers.i.mixer.in_proj`` ([q; k; v] rows)
``layers.i.self_attn.o_proj``           ``backbone.layers.i.mixer.out_proj``
``layers.i.pre_ff_layernorm``           ``backbone.layers.i.norm2``
``layers.i.feed_forward.{up,gate}_proj``  ``backbone.layers.i.mlp.fc1`` ([up; gate] rows)
``layers.i.feed_forward.down_proj``     ``backbone.layers.i.mlp.fc2``
``model.final_layernorm``               ``backbone.norm_f``
======================================  ==============================================

Its gated norm covers all of d_inner at once with ``rms_norm_eps`` (``BambaRMSNormGated``), its
residual stream stays in the model's dtype (``residual_in_fp32: false``), its attention rotates the
first ``partial_rotary_factor * head_dim`` channels (GPT-NeoX halves, base ``rope_theta``). A
setting this repository cannot represent (an MLP bias, RoPE scaling, an MLP width that is not a
multiple of 128, attention dropout, ...) is refused naming it.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from handover.unsupported import UnsupportedCheckpoint, integral_expand, require
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MLP_MULTIPLE_OF

# Hybrid families transformers 4.53 knows, and what each has that this repository's hybrid lacks
# (read from their modeling files). Loading one into MambaLMHeadModel would change its numbers.
OTHER_HYBRIDS: dict[str, tuple[str, str]] = {
    "jamba": (
        "AI21's Jamba (JambaForCausalLM)",
        "mixture-of-experts MLPs and Mamba-1 mixers with RMS norms on dt, B and C inside attention hybrids",
    ),
    "zamba": (
        "Zyphra's Zamba (ZambaForCausalLM)",
        "one attention block shared by many layers, fed the concatenated original embeddings",
    ),
    "zamba2": (
        "Zyphra's Zamba2 (Zamba2ForCausalLM)",
        "shared attention+MLP blocks with per-layer LoRA adapters and concatenated original embeddings",
    ),
    "falcon_h1": (
        "TII's Falcon-H1 (FalconH1ForCausalLM)",
        "attention and Mamba-2 running in parallel inside each layer, with muP multipliers on every branch",
    ),
    "granitemoehybrid": (
        "IBM's Granite 4.0 hybrid (GraniteMoeHybridForCausalLM)",
        "mixture-of-experts MLPs with a shared expert and Granite's embedding, residual and logit multipliers",
    ),
    "nemotron_h": (
        "NVIDIA's Nemotron-H (NemotronHForCausalLM)",
        "layers that are each only a Mamba-2 mixer, only attention or only an MLP (a hybrid_override_pattern)",
    ),
}


def refuse_other_hybrid(model_type: str, source: str) -> None:
    """Raise naming the family and what it has, if ``model_type`` is a hybrid this repository lacks."""
    if model_type in OTHER_HYBRIDS:
        family, has = OTHER_HYBRIDS[model_type]
        raise UnsupportedCheckpoint(
            f"{source}: model_type={model_type!r} is {family}, which has {has}; this repository's hybrid "
            "(Mamba layers, attention layers, a gated MLP after each: HF's Bamba) cannot hold it, so it is "
            "refused rather than loaded into a different model"
        )


def config_from_bamba(raw: dict[str, Any], source: str) -> MambaConfig:
    """Our config from an HF ``BambaConfig`` ``config.json`` (transformers' own defaults applied)."""
    from transformers import BambaConfig

    try:
        hf = BambaConfig.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise UnsupportedCheckpoint(f"{source}: transformers refuses this config: {exc}") from exc
    if hf.hidden_act not in ("silu", "swish"):
        require(hf.hidden_act, "silu", "hidden_act", "SiLU gates in the mixer and the MLP", source)
    require(bool(hf.mlp_bias), False, "mlp_bias", "this repository's gated MLP has no biases", source)
    if hf.intermediate_size % MLP_MULTIPLE_OF:
        raise UnsupportedCheckpoint(
            f"{source}: intermediate_size={hf.intermediate_size} is not a multiple of {MLP_MULTIPLE_OF}: this "
            f"repository's gated MLP (mamba_ssm's GatedMLP) rounds its width up to one, so it is refused"
        )
    if getattr(hf, "z_loss_coefficient", 0.0):
        warnings.warn(
            f"{source}: z_loss_coefficient={hf.z_loss_coefficient} is a training loss term this repository does "
            "not add; the weights load exactly, continued training uses plain cross-entropy",
            stacklevel=3,
        )
    attn_layer_idx = sorted(hf.attn_layer_indices or [])
    attn = AttnConfig()
    if attn_layer_idx:
        require(getattr(hf, "rope_scaling", None), None, "rope_scaling", "scaled or extended RoPE", source)
        require(float(hf.attention_dropout), 0.0, "attention_dropout", "dropout on attention weights", source)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rotary = int(head_dim * hf.partial_rotary_factor)
        if rotary % 2:
            raise UnsupportedCheckpoint(
                f"{source}: partial_rotary_factor={hf.partial_rotary_factor} rotates {rotary} channels of each "
                f"{head_dim}-channel head, an odd number: transformers then rotates {rotary + 1}; refused"
            )
        attn = AttnConfig(
            num_heads=hf.num_attention_heads,
            num_heads_kv=hf.num_key_value_heads,
            head_dim=None if head_dim * hf.num_attention_heads == hf.hidden_size else head_dim,
            rotary_emb_dim=rotary,
            rotary_base=float(hf.rope_theta),
            qkv_proj_bias=bool(hf.attention_bias),
            out_proj_bias=bool(hf.attention_bias),
        )
    vocab = hf.vocab_size
    try:
        return MambaConfig(
            d_model=hf.hidden_size,
            n_layer=hf.num_hidden_layers,
            vocab_size=vocab,
            pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1,
            d_intermediate=hf.intermediate_size,
            ssm=SSMConfig(
                layer="mamba2",
                d_state=hf.mamba_d_state,
                d_conv=hf.mamba_d_conv,
                expand=integral_expand(hf.mamba_expand, "mamba_expand", source),
                headdim=hf.mamba_d_head,
                ngroups=hf.mamba_n_groups,
                chunk_size=hf.mamba_chunk_size,
                conv_bias=hf.mamba_conv_bias,
                bias=hf.mamba_proj_bias,
                gated_norm_eps=hf.rms_norm_eps,
                gated_norm_per_group=hf.mamba_n_groups == 1,  # BambaRMSNormGated: all d_inner at once
            ),
            attn_layer_idx=attn_layer_idx,
            attn=attn,
            rms_norm=True,
            norm_epsilon=hf.rms_norm_eps,
            residual_in_fp32=False,  # Bamba adds the residual in the model's dtype
            tie_embeddings=hf.tie_word_embeddings,
            initializer_range=hf.initializer_range,
        )
    except ValueError as exc:
        raise UnsupportedCheckpoint(f"{source}: {exc}") from exc


def bamba_config_dict(cfg: MambaConfig) -> dict[str, Any]:
    """The HF ``BambaConfig`` fields equivalent to ``cfg`` (raises naming what Bamba cannot hold)."""
    s, a = cfg.ssm, cfg.attn
    problems = []
    if s.layer != "mamba2":
        problems.append(f"model.ssm.layer={s.layer} (Bamba's SSM layers are Mamba-2)")
    if cfg.d_intermediate <= 0:
        problems.append("model.d_intermediate=0 (every Bamba layer has an MLP)")
    if not cfg.rms_norm:
        problems.append("LayerNorm (rms_norm=false)")
    if s.gated_norm_eps != cfg.norm_epsilon:
        problems.append(
            f"model.ssm.gated_norm_eps={s.gated_norm_eps} != model.norm_epsilon={cfg.norm_epsilon}"
        )
    if s.ngroups > 1 and s.gated_norm_per_group:
        problems.append("model.ssm.gated_norm_per_group=true with ngroups > 1 (Bamba normalises all d_inner)")
    if cfg.attn_layer_idx and a.qkv_proj_bias != a.out_proj_bias:
        problems.append("model.attn.qkv_proj_bias != out_proj_bias (Bamba has one attention_bias)")
    if cfg.attn_layer_idx and not a.rotary_emb_dim:
        problems.append("model.attn.rotary_emb_dim=0 (Bamba's attention always rotates)")
    if problems:
        raise ValueError(
            f"HF's Bamba cannot hold {'; '.join(problems)}; export this model with export_mamba_ssm "
            "(format: mamba_ssm) instead"
        )
    if cfg.residual_in_fp32:
        warnings.warn(
            "HF's Bamba adds the residual stream in the model's dtype, this model in float32 "
            "(model.residual_in_fp32=true): in float32 they are equal, in bf16 they differ slightly",
            stacklevel=3,
        )
    hidden = (cfg.d_intermediate + MLP_MULTIPLE_OF - 1) // MLP_MULTIPLE_OF * MLP_MULTIPLE_OF
    config: dict[str, Any] = dict(
        model_type="bamba",
        architectures=["BambaForCausalLM"],
        vocab_size=cfg.padded_vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_size=cfg.d_model,
        intermediate_size=hidden,
        num_hidden_layers=cfg.n_layer,
        hidden_act="silu",
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.norm_epsilon,
        attn_layer_indices=list(cfg.attn_layer_idx),
        mamba_n_heads=cfg.nheads,
        mamba_d_head=s.headdim,
        mamba_n_groups=s.ngroups,
        mamba_d_state=s.d_state,
        mamba_d_conv=s.d_conv,
        mamba_expand=s.expand,
        mamba_chunk_size=s.chunk_size,
        mamba_conv_bias=s.conv_bias,
        mamba_proj_bias=s.bias,
        num_attention_heads=a.num_heads,
        num_key_value_heads=cfg.attn_num_heads_kv,
    )
    if cfg.attn_layer_idx:
        head_dim = cfg.attn_head_dim
        config.update(
            head_dim=head_dim,
            partial_rotary_factor=a.rotary_emb_dim / head_dim,
            rope_theta=a.rotary_base,
            attention_bias=a.qkv_proj_bias,
        )
    return config


def bamba_state_dict_to_ours(sd: dict[str, Tensor], cfg: MambaConfig) -> dict[str, Tensor]:
    """Bamba's parameter names and layouts -> ours (see the module table)."""
    import torch

    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in ("model.embed_tokens.weight", "model.final_layernorm.weight", "lm_head.weight"):
            out[{"model.embed_tokens.weight": "backbone.embedding.weight",
                 "model.final_layernorm.weight": "backbone.norm_f.weight",
                 "lm_head.weight": "lm_head.weight"}[key]] = value  # fmt: skip
            continue
        if not key.startswith("model.layers."):
            out[key] = value  # an unknown name: load_weights reports it
            continue
        i, rest = key.removeprefix("model.layers.").split(".", 1)
        prefix = f"backbone.layers.{i}."
        if rest.startswith("mamba."):
            out[prefix + "mixer." + rest.removeprefix("mamba.")] = value
        elif rest.startswith("self_attn.o_proj."):
            out[prefix + "mixer.out_proj." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("self_attn."):
            continue  # q/k/v: concatenated below
        elif rest.startswith("feed_forward.down_proj."):
            out[prefix + "mlp.fc2." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("feed_forward."):
            continue  # up/gate: concatenated below
        elif rest.startswith("input_layernorm."):
            out[prefix + "norm." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("pre_ff_layernorm."):
            out[prefix + "norm2." + rest.rsplit(".", 1)[1]] = value
        else:
            out[key] = value
    for i in range(cfg.n_layer):
        src = f"model.layers.{i}."
        if f"{src}feed_forward.up_proj.weight" in sd:
            out[f"backbone.layers.{i}.mlp.fc1.weight"] = torch.cat(
                [sd[f"{src}feed_forward.up_proj.weight"], sd[f"{src}feed_forward.gate_proj.weight"]]
            )
        for kind in ("weight", "bias"):
            if f"{src}self_attn.q_proj.{kind}" in sd:
                out[f"backbone.layers.{i}.mixer.in_proj.{kind}"] = torch.cat(
                    [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                )
    return out


def ours_to_bamba_state_dict(sd: dict[str, Tensor], cfg: MambaConfig) -> dict[str, Tensor]:
    """Our parameter names and layouts -> Bamba's (the inverse of ``bamba_state_dict_to_ours``)."""
    out: dict[str, Tensor] = {}
    q_rows = cfg.attn.num_heads * cfg.attn_head_dim
    kv_rows = cfg.attn_num_heads_kv * cfg.attn_head_dim
    hidden = (cfg.d_intermediate + MLP_MULTIPLE_OF - 1) // MLP_MULTIPLE_OF * MLP_MULTIPLE_OF
    for key, value in sd.items():
        if key in ("backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"):
            out[{"backbone.embedding.weight": "model.embed_tokens.weight",
                 "backbone.norm_f.weight": "model.final_layernorm.weight",
                 "lm_head.weight": "lm_head.weight"}[key]] = value  # fmt: skip
            continue
        i, rest = key.removeprefix("backbone.layers.").split(".", 1)
        prefix = f"model.layers.{i}."
        attention = int(i) in cfg.attn_layer_idx
        if rest.startswith("mixer.in_proj.") and attention:
            q, k, v = value.split([q_rows, kv_rows, kv_rows])
            kind = rest.rsplit(".", 1)[1]
            out.update(
                {f"{prefix}self_attn.{n}_proj.{kind}": t.contiguous() for n, t in zip("qkv", (q, k, v))}
            )
        elif rest.startswith("mixer.out_proj.") and attention:
            out[prefix + "self_attn.o_proj." + rest.rsplit(".", 1)[1]] = value
        elif rest.startswith("mixer."):
            out[prefix + "mamba." + rest.removeprefix("mixer.")] = value
        elif rest == "mlp.fc1.weight":
            up, gate = value.split([hidden, hidden])
            out[prefix + "feed_forward.up_proj.weight"] = up.contiguous()
            out[prefix + "feed_forward.gate_proj.weight"] = gate.contiguous()
        elif rest == "mlp.fc2.weight":
            out[prefix + "feed_forward.down_proj.weight"] = value
        elif rest.startswith("norm2."):
            out[prefix + "pre_ff_layernorm." + rest.removeprefix("norm2.")] = value
        elif rest.startswith("norm."):
            out[prefix + "input_layernorm." + rest.removeprefix("norm.")] = value
        else:
            raise AssertionError(f"no Bamba name for {key}")
    return out
