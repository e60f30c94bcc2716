"""mamba_ssm's own format: ``config.json`` + ``pytorch_model.bin``, as ``mamba_ssm.MambaLMHeadModel``
``save_pretrained`` writes them and the state-spaces releases ship them (``state-spaces/mamba-130m``,
``mamba2-2.7b``, ...). It holds every model here, hybrids with any attention settings included;
the parameter names are ours (``MambaLMHeadModel`` keeps mamba_ssm's).

A mamba_ssm ``config.json`` is ``MambaConfig.__dict__``: ``ssm_cfg`` and ``attn_cfg`` hold only the
keyword arguments their author passed; everything else is a constructor default, and those
differ by layer type (Mamba-2's d_state is 128, Mamba-1's 16). The tables below are the
defaults of mamba_ssm 2.3.1 (models/config_mamba.py, modules/mamba_simple.py Mamba,
modules/mamba2.py Mamba2, modules/mha.py MHA), read from its source.

Reading a folder (either format) is ``handover.weights.read_pretrained``; the directory is
written under a temporary name and renamed, so an interrupted export never leaves a directory
that looks complete.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from common.io import atomic_dir
from handover.unsupported import UnsupportedCheckpoint, integral_expand, merge_defaults, require
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

MAMBA_SSM_MODEL_DEFAULTS: dict[str, Any] = {
    "d_model": 2560,
    "d_intermediate": 0,
    "n_layer": 64,
    "vocab_size": 50277,
    "ssm_cfg": {},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,  # a kernel choice: same numbers either way
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
MAMBA_SSM_LAYER_DEFAULTS: dict[str, dict[str, Any]] = {
    "Mamba1": {
        "d_state": 16,
        "d_conv": 4,
        "expand": 2,
        "dt_rank": "auto",
        "dt_min": 0.001,
        "dt_max": 0.1,
        "dt_init": "random",
        "dt_scale": 1.0,
        "dt_init_floor": 1e-4,
        "conv_bias": True,
        "bias": False,
        "use_fast_path": True,
    },
    "Mamba2": {
        "d_state": 128,
        "d_conv": 4,
        "conv_init": None,
        "expand": 2,
        "headdim": 64,
        "d_ssm": None,
        "ngroups": 1,
        "A_init_range": [1, 16],
        "D_has_hdim": False,
        "rmsnorm": True,
        "norm_before_gate": False,
        "dt_min": 0.001,
        "dt_max": 0.1,
        "dt_init_floor": 1e-4,
        "dt_limit": [0.0, math.inf],
        "bias": False,
        "conv_bias": True,
        "chunk_size": 256,
        "use_mem_eff_path": True,
        "sequence_parallel": True,
    },
}
MAMBA_SSM_MHA_DEFAULTS: dict[str, Any] = {
    "num_heads": None,  # required by MHA
    "num_heads_kv": None,
    "head_dim": None,
    "mlp_dim": 0,
    "qkv_proj_bias": True,
    "out_proj_bias": True,
    "softmax_scale": None,
    "causal": False,
    "d_conv": 0,
    "rotary_emb_dim": 0,
    "rotary_emb_base": 10000.0,
    "rotary_emb_interleaved": False,
}


def config_from_mamba_ssm(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """Our config from a mamba_ssm ``config.json``, with mamba_ssm's defaults for what it leaves out."""
    ms = merge_defaults(raw, MAMBA_SSM_MODEL_DEFAULTS, "the top level", source)
    ssm_in = dict(ms["ssm_cfg"] or {})
    layer = ssm_in.pop("layer", "Mamba1")
    if layer not in MAMBA_SSM_LAYER_DEFAULTS:
        raise UnsupportedCheckpoint(
            f"{source}: ssm_cfg.layer={layer!r} is not Mamba1 or Mamba2 (mamba_ssm's choices)"
        )
    s = merge_defaults(ssm_in, MAMBA_SSM_LAYER_DEFAULTS[layer], f"ssm_cfg ({layer})", source)
    expand = integral_expand(s["expand"], "ssm_cfg.expand", source)
    ssm: dict[str, Any] = {
        "layer": layer.lower(),
        "d_state": s["d_state"],
        "d_conv": s["d_conv"],
        "expand": expand,
        "dt_min": s["dt_min"],
        "dt_max": s["dt_max"],
        "dt_init_floor": s["dt_init_floor"],
        "conv_bias": s["conv_bias"],
        "bias": s["bias"],
    }
    if layer == "Mamba1":
        ssm.update(
            dt_rank=None if s["dt_rank"] == "auto" else s["dt_rank"],
            dt_init=s["dt_init"],
            dt_scale=s["dt_scale"],
        )
    else:
        d_inner = expand * ms["d_model"]
        if s["d_ssm"] is not None:
            require(
                s["d_ssm"],
                d_inner,
                "ssm_cfg.d_ssm",
                "an SSM on part of d_inner with a gated MLP beside it",
                source,
            )
        require(
            bool(s["D_has_hdim"]), False, "ssm_cfg.D_has_hdim", "D per channel instead of per head", source
        )
        require(bool(s["rmsnorm"]), True, "ssm_cfg.rmsnorm", "Mamba-2 without its gated output norm", source)
        require(
            bool(s["norm_before_gate"]), False, "ssm_cfg.norm_before_gate", "norm before the z gate", source
        )
        dt_limit = [float(v) for v in s["dt_limit"]]
        require(dt_limit, [0.0, math.inf], "ssm_cfg.dt_limit", "clamping dt", source)
        if s["conv_init"] is not None:
            warnings.warn(
                f"{source}: ssm_cfg.conv_init={s['conv_init']} only sets the conv weights' initial range; "
                "the checkpoint's trained weights are loaded as they are",
                stacklevel=3,
            )
        lo, hi = s["A_init_range"]
        ssm.update(
            headdim=s["headdim"],
            ngroups=s["ngroups"],
            chunk_size=s["chunk_size"],
            A_init_min=float(lo),
            A_init_max=float(hi),
            gated_norm_eps=1e-5,  # mamba_ssm's Mamba2 fixes it
            gated_norm_per_group=True,
        )
    attn_layer_idx = list(ms["attn_layer_idx"] or [])
    attn = AttnConfig()
    if attn_layer_idx:
        a = merge_defaults(dict(ms["attn_cfg"] or {}), MAMBA_SSM_MHA_DEFAULTS, "attn_cfg", source)
        if a["num_heads"] is None:
            raise UnsupportedCheckpoint(f"{source}: attn_cfg has no num_heads (mamba_ssm's MHA requires it)")
        require(
            bool(a["causal"]),
            True,
            "attn_cfg.causal",
            "mamba_ssm's MHA default is non-causal attention",
            source,
        )
        require(a["d_conv"], 0, "attn_cfg.d_conv", "a depthwise convolution on q, k, v", source)
        require(a["mlp_dim"], 0, "attn_cfg.mlp_dim", "an MLP fused into the attention projections", source)
        require(
            bool(a["rotary_emb_interleaved"]),
            False,
            "attn_cfg.rotary_emb_interleaved",
            "interleaved rotary",
            source,
        )
        head_dim = a["head_dim"] or ms["d_model"] // a["num_heads"]
        if a["softmax_scale"] is not None and not math.isclose(a["softmax_scale"], head_dim**-0.5):
            require(
                a["softmax_scale"],
                None,
                "attn_cfg.softmax_scale",
                "a softmax scale other than 1/sqrt(head_dim)",
                source,
            )
        attn = AttnConfig(
            num_heads=a["num_heads"],
            num_heads_kv=a["num_heads_kv"],
            head_dim=a["head_dim"],
            rotary_emb_dim=a["rotary_emb_dim"],
            rotary_base=float(a["rotary_emb_base"]),
            qkv_proj_bias=a["qkv_proj_bias"],
            out_proj_bias=a["out_proj_bias"],
        )
    try:
        return MambaConfig(
            d_model=ms["d_model"],
            n_layer=ms["n_layer"],
            vocab_size=ms["vocab_size"],
            d_intermediate=ms["d_intermediate"],
            pad_vocab_size_multiple=ms["pad_vocab_size_multiple"],
            ssm=SSMConfig(**ssm),
            attn_layer_idx=attn_layer_idx,
            attn=attn,
            rms_norm=ms["rms_norm"],
            norm_epsilon=1e-5,  # MambaLMHeadModel does not pass one: MixerModel's default
            residual_in_fp32=ms["residual_in_fp32"],
            tie_embeddings=ms["tie_embeddings"],
        )
    except ValueError as exc:
        raise UnsupportedCheckpoint(f"{source}: {exc}") from exc


def export_mamba_ssm(model: MambaLMHeadModel, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as mamba_ssm's ``MambaLMHeadModel.save_pretrained`` does (config.json + pytorch_model.bin)."""
    cfg = model.config
    s = cfg.ssm
    problems = []
    if cfg.norm_epsilon != 1e-5:
        problems.append(f"model.norm_epsilon={cfg.norm_epsilon} (mamba_ssm fixes 1e-5)")
    if s.layer == "mamba2" and s.gated_norm_eps != 1e-5:
        problems.append(f"model.ssm.gated_norm_eps={s.gated_norm_eps} (mamba_ssm fixes 1e-5)")
    if s.layer == "mamba2" and s.ngroups > 1 and not s.gated_norm_per_group:
        problems.append("model.ssm.gated_norm_per_group=false (mamba_ssm normalises per group)")
    if s.b_c_dt_rms:
        problems.append(
            "model.ssm.b_c_dt_rms=true (Falcon-Mamba's dt/B/C norms: mamba_ssm's Mamba module has none)"
        )
    if problems:
        raise ValueError(f"mamba_ssm's format cannot hold {'; '.join(problems)}; export with format hf")
    ssm_cfg: dict[str, Any] = {
        "layer": {"mamba1": "Mamba1", "mamba2": "Mamba2"}[s.layer],
        "d_state": s.d_state,
        "d_conv": s.d_conv,
        "expand": s.expand,
        "dt_min": s.dt_min,
        "dt_max": s.dt_max,
        "dt_init_floor": s.dt_init_floor,
        "conv_bias": s.conv_bias,
        "bias": s.bias,
    }
    if s.layer == "mamba1":
        ssm_cfg.update(dt_rank=cfg.dt_rank, dt_init=s.dt_init, dt_scale=s.dt_scale)
    else:
        ssm_cfg.update(
            headdim=s.headdim,
            ngroups=s.ngroups,
            chunk_size=s.chunk_size,
            A_init_range=[s.A_init_min, s.A_init_max],
        )
    a = cfg.attn
    attn_cfg = {
        "num_heads": a.num_heads,
        "num_heads_kv": cfg.attn_num_heads_kv,
        "head_dim": cfg.attn_head_dim,
        "rotary_emb_dim": a.rotary_emb_dim,
        "rotary_emb_base": a.rotary_base,
        "qkv_proj_bias": a.qkv_proj_bias,
        "out_proj_bias": a.out_proj_bias,
        "causal": True,
    }
    config = {
        "d_model": cfg.d_model,
        "d_intermediate": cfg.d_intermediate,
        "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": list(cfg.attn_layer_idx),
        "attn_cfg": attn_cfg if cfg.attn_layer_idx else {},
        "rms_norm": cfg.rms_norm,
        "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "tie_embeddings": cfg.tie_embeddings,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        torch.save(model.state_dict(), tmp / "pytorch_model.bin")
    return out_dir
