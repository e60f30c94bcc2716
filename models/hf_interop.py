"""Checkpoint interoperability: HF transformers directories and mamba_ssm's format.

- ``export_hf``: a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
  offline (``MambaForCausalLM`` for Mamba-1, ``Mamba2ForCausalLM`` for Mamba-2): config.json,
  model.safetensors and, when given, the tokenizer files. HF's state-dict names equal ours
  except ``backbone.embedding`` -> ``backbone.embeddings`` (../STACK.md).
- ``export_mamba_ssm``: config.json + pytorch_model.bin as ``mamba_ssm.MambaLMHeadModel``
  saves them; the only format that holds hybrids (attention layers, MLPs).
- ``load_pretrained``: either format back into ``MambaLMHeadModel``.

Directories are written under a temporary name and renamed, so an interrupted export never
leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.io import atomic_dir
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MAMBA2_GATED_NORM_EPS, MambaLMHeadModel

HF_EMBEDDING = "backbone.embeddings.weight"
OUR_EMBEDDING = "backbone.embedding.weight"


def hf_config_dict(cfg: MambaConfig) -> dict[str, Any]:
    """The HF ``MambaConfig`` / ``Mamba2Config`` fields equivalent to ``cfg`` (raises if none is)."""
    problems = []
    if cfg.attn_layer_idx:
        problems.append("attention layers (attn_layer_idx)")
    if cfg.d_intermediate:
        problems.append("MLPs (d_intermediate > 0)")
    if not cfg.rms_norm:
        problems.append("LayerNorm (rms_norm=false)")
    if problems:
        raise ValueError(
            f"HF transformers' Mamba classes cannot hold {', '.join(problems)}; "
            "export this model with export_mamba_ssm (format: mamba_ssm) instead"
        )
    s = cfg.ssm
    common = dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.d_model,
        state_size=s.d_state,
        num_hidden_layers=cfg.n_layer,
        layer_norm_epsilon=cfg.norm_epsilon,
        expand=s.expand,
        conv_kernel=s.d_conv,
        use_bias=s.bias,
        use_conv_bias=s.conv_bias,
        hidden_act="silu",
        initializer_range=cfg.initializer_range,
        residual_in_fp32=cfg.residual_in_fp32,
        time_step_min=s.dt_min,
        time_step_max=s.dt_max,
        time_step_floor=s.dt_init_floor,
        rescale_prenorm_residual=cfg.rescale_prenorm_residual,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if s.layer == "mamba1":
        return dict(
            common,
            model_type="mamba",
            architectures=["MambaForCausalLM"],
            intermediate_size=cfg.d_inner,
            time_step_rank=cfg.dt_rank,
            time_step_scale=s.dt_scale,
            time_step_init_scheme=s.dt_init,
        )
    if cfg.norm_epsilon != MAMBA2_GATED_NORM_EPS:
        raise ValueError(
            f"model.norm_epsilon={cfg.norm_epsilon}: HF's Mamba2 uses it for the gated norm too, where "
            f"mamba_ssm fixes {MAMBA2_GATED_NORM_EPS}; export with format mamba_ssm or use 1e-5"
        )
    if s.ngroups > 1:
        warnings.warn(
            "HF transformers' Mamba2 (<= 4.53) normalises the gated output over all d_inner channels, "
            f"mamba_ssm over each of the ngroups={s.ngroups} groups: the HF model will not match this one "
            "exactly after the SSM. Use format mamba_ssm for exact round trips.",
            stacklevel=3,
        )
    return dict(
        common,
        model_type="mamba2",
        architectures=["Mamba2ForCausalLM"],
        num_heads=cfg.nheads,
        head_dim=s.headdim,
        n_groups=s.ngroups,
        chunk_size=s.chunk_size,
        rms_norm=True,
        time_step_limit=[0.0, math.inf],
    )


def _state_dict_for_export(model: MambaLMHeadModel) -> dict[str, Tensor]:
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # one tensor, two names: the loader re-ties it
    return sd


def export_hf(
    model: MambaLMHeadModel,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an HF transformers directory (``AutoModelForCausalLM`` loads it offline)."""
    from safetensors.torch import save_file

    config = hf_config_dict(model.config)
    sd = _state_dict_for_export(model)
    sd[HF_EMBEDDING] = sd.pop(OUR_EMBEDDING)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, tmp)
    return out_dir


def export_mamba_ssm(model: MambaLMHeadModel, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` as mamba_ssm's ``MambaLMHeadModel.save_pretrained`` does (config.json + pytorch_model.bin)."""
    cfg = model.config
    if cfg.norm_epsilon != 1e-5:
        raise ValueError(f"mamba_ssm's format has no norm_epsilon field (fixed 1e-5); got {cfg.norm_epsilon}")
    s = cfg.ssm
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


def _copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc
    tok.save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------------------------
# Loading


def config_from_hf(hf: dict[str, Any]) -> MambaConfig:
    """Our config from an HF ``config.json`` of model_type mamba or mamba2."""
    vocab = hf["vocab_size"]
    common = dict(
        d_model=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"],
        vocab_size=vocab,
        pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1,
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=hf.get("residual_in_fp32", True),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        initializer_range=hf.get("initializer_range", 0.1),
    )
    ssm = dict(
        d_state=hf["state_size"],
        d_conv=hf["conv_kernel"],
        expand=hf["expand"],
        bias=hf.get("use_bias", False),
        conv_bias=hf.get("use_conv_bias", True),
        dt_min=hf.get("time_step_min", 0.001),
        dt_max=hf.get("time_step_max", 0.1),
        dt_init_floor=hf.get("time_step_floor", 1e-4),
    )
    if hf.get("model_type") == "mamba":
        ssm.update(
            layer="mamba1",
            dt_rank=hf["time_step_rank"],
            dt_scale=hf.get("time_step_scale", 1.0),
            dt_init=hf.get("time_step_init_scheme", "random"),
        )
    elif hf.get("model_type") == "mamba2":
        ssm.update(
            layer="mamba2",
            headdim=hf["head_dim"],
            ngroups=hf.get("n_groups", 1),
            chunk_size=hf.get("chunk_size", 256),
        )
    else:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'mamba' or 'mamba2'")
    return MambaConfig(ssm=SSMConfig(**ssm), **common)


def config_from_mamba_ssm(ms: dict[str, Any]) -> MambaConfig:
    """Our config from a mamba_ssm ``config.json`` (``MambaConfig`` of mamba_ssm)."""
    ssm_in = dict(ms.get("ssm_cfg") or {})
    layer = ssm_in.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"ssm_cfg.layer={layer!r} is not Mamba1 or Mamba2")
    ssm = {"layer": layer.lower()}
    if "A_init_range" in ssm_in:
        ssm["A_init_min"], ssm["A_init_max"] = ssm_in.pop("A_init_range")
    known = {f for f in SSMConfig.__dataclass_fields__}
    unknown = sorted(set(ssm_in) - known)
    if unknown:
        raise ValueError(f"ssm_cfg has fields this repository does not implement: {unknown}")
    ssm.update(ssm_in)
    attn_in = dict(ms.get("attn_cfg") or {})
    attn_in.pop("causal", None)
    if "rotary_emb_base" in attn_in:
        attn_in["rotary_base"] = attn_in.pop("rotary_emb_base")
    unknown = sorted(set(attn_in) - set(AttnConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"attn_cfg has fields this repository does not implement: {unknown}")
    return MambaConfig(
        d_model=ms["d_model"],
        n_layer=ms["n_layer"],
        vocab_size=ms["vocab_size"],
        d_intermediate=ms.get("d_intermediate", 0),
        pad_vocab_size_multiple=ms.get("pad_vocab_size_multiple", 8),
        ssm=SSMConfig(**ssm),
        attn_layer_idx=list(ms.get("attn_layer_idx") or []),
        attn=AttnConfig(**attn_in),
        rms_norm=ms.get("rms_norm", True),
        residual_in_fp32=ms.get("residual_in_fp32", True),
        tie_embeddings=ms.get("tie_embeddings", True),
    )


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
        return sd
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_pretrained(path: str | Path, **overrides: Any) -> MambaLMHeadModel:
    """Load an HF transformers or mamba_ssm directory into ``MambaLMHeadModel`` (fp32, CPU).

    ``overrides`` replace config fields (e.g. ``impl="torch"``).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not an HF or mamba_ssm model directory")
    raw = json.loads(config_path.read_text())
    is_hf = "model_type" in raw
    cfg = config_from_hf(raw) if is_hf else config_from_mamba_ssm(raw)
    if overrides:
        cfg = replace(cfg, **overrides)
    sd = _read_weights(path)
    if is_hf:
        sd[OUR_EMBEDDING] = sd.pop(HF_EMBEDDING)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = MambaLMHeadModel(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    return model
