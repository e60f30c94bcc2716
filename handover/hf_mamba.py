"""Checkpoint interoperability: HF transformers directories and mamba_ssm's format.

- ``export_hf``: a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
  offline (``MambaForCausalLM`` for Mamba-1, ``FalconMambaForCausalLM`` for Mamba-1 with
  ``ssm.b_c_dt_rms``, ``Mamba2ForCausalLM`` for Mamba-2, ``BambaForCausalLM`` for hybrids:
  handover/bamba.py): config.json,
  model.safetensors and, when given, the tokenizer files. HF's state-dict names equal ours
  except ``backbone.embedding`` -> ``backbone.embeddings``.
- ``export_mamba_ssm``: config.json + pytorch_model.bin as ``mamba_ssm.MambaLMHeadModel``
  saves them; it holds every model here, hybrids with any attention or norm settings included.
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
from handover.reader import assign_weights, read_safetensors, read_torch_weights
from handover.unsupported import UnsupportedCheckpoint, integral_expand, merge_defaults, require
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

HF_EMBEDDING = "backbone.embeddings.weight"
OUR_EMBEDDING = "backbone.embedding.weight"


def hf_config_dict(cfg: MambaConfig) -> dict[str, Any]:
    """The HF ``MambaConfig`` / ``FalconMambaConfig`` / ``Mamba2Config`` fields equivalent to ``cfg``, or
    ``BambaConfig``'s for a hybrid (attention layers or MLPs); raises naming what none can hold."""
    if cfg.attn_layer_idx or cfg.d_intermediate:
        from handover.bamba import bamba_config_dict

        return bamba_config_dict(cfg)
    problems = []
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
        mamba1 = dict(
            common,
            model_type="mamba",
            architectures=["MambaForCausalLM"],
            intermediate_size=cfg.d_inner,
            time_step_rank=cfg.dt_rank,
            time_step_scale=s.dt_scale,
            time_step_init_scheme=s.dt_init,
        )
        if s.b_c_dt_rms:  # Falcon-Mamba: FalconMambaConfig is MambaConfig + mixer_rms_eps
            mamba1.update(
                model_type="falcon_mamba",
                architectures=["FalconMambaForCausalLM"],
                mixer_rms_eps=s.b_c_dt_rms_eps,
            )
        return mamba1
    if s.gated_norm_eps != cfg.norm_epsilon:
        raise ValueError(
            f"model.ssm.gated_norm_eps={s.gated_norm_eps} differs from model.norm_epsilon={cfg.norm_epsilon}: "
            "HF's Mamba2 uses one layer_norm_epsilon for both; export with format mamba_ssm"
        )
    if s.ngroups > 1 and s.gated_norm_per_group:
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
    # No copy: the writer streams each tensor to the file (a memory-mapped one stays on disk).
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")  # one tensor, two names: the loader re-ties it
    return sd


def _write_weights(path: Path, sd: dict[str, Tensor]) -> None:
    """``model.safetensors``, one tensor at a time: no second copy of the model is ever built
    (safetensors' ``save_file`` turns every tensor into bytes first: two more copies at 1.6B)."""
    from handover.tensor_files import PendingTensor, write_safetensors

    pending = [
        PendingTensor(name, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()) for name, t in sd.items()
    ]
    write_safetensors(path, pending, {"format": "pt"})


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def tokenizer_special_ids(tokenizer_dir: str | Path) -> dict[str, int | None]:
    """The bos/eos/pad/unk ids of a tokenizer as transformers' ``AutoTokenizer`` reads them (None: it has none)."""
    tok = _load_tokenizer(tokenizer_dir)
    return {name: getattr(tok, name) for name in SPECIAL_TOKEN_IDS}


def hf_config_special_ids(raw: dict[str, Any]) -> dict[str, int | None] | None:
    """The special-token ids an HF ``config.json`` states explicitly; None when it states none.

    A config without them means transformers' class defaults (0 for the Mamba classes, a real
    token), which say nothing about the tokenizer, so they are not taken as known.
    """
    if not any(name in raw for name in SPECIAL_TOKEN_IDS):
        return None
    return {name: raw.get(name) for name in SPECIAL_TOKEN_IDS}


def export_hf(
    model: MambaLMHeadModel,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    special_token_ids: dict[str, int | None] | None = None,
) -> Path:
    """Write ``model`` as an HF transformers directory (``AutoModelForCausalLM`` loads it offline).

    ``config.json`` always states bos/eos/pad ids, never transformers' defaults (0 for the Mamba
    classes, a real token): the tokenizer's, else ``special_token_ids`` (what a run recorded in its
    checkpoints), else null. With both, they must agree.

    With a tokenizer the directory is what ``transformers`` users expect: ``generation_config.json``
    stops at the end-of-text and, for chat, ``<|im_end|>``, and
    never emits the embedding's padding rows (``suppress_tokens``),
    and the tokenizer is saved with its chat template and without ``token_type_ids`` among its
    outputs, so ``model.generate(**tokenizer(text, return_tensors="pt"))`` works.
    """
    config = hf_config_dict(model.config)
    sd = _state_dict_for_export(model)
    if config["model_type"] == "bamba":
        from handover.bamba import ours_to_bamba_state_dict

        sd = ours_to_bamba_state_dict(sd, model.config)
    else:
        sd[HF_EMBEDDING] = sd.pop(OUR_EMBEDDING)
    dtypes = {t.dtype for t in sd.values()}
    config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    tok = _load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    # The embedding is padded past the vocabulary (pad_vocab_size_multiple); its extra rows are no
    # tokens, so generation never picks them (ours restricts logits to vocab_size the same way).
    padding = list(range(model.config.vocab_size, model.config.padded_vocab_size))
    generation: dict[str, Any] = {"suppress_tokens": padding} if padding else {}
    known = dict(special_token_ids) if special_token_ids is not None else None
    im_end = None
    if tok is not None:
        if len(tok) > model.config.padded_vocab_size:
            raise ValueError(
                f"the tokenizer {tokenizer_dir} has {len(tok)} tokens but the model only "
                f"{model.config.padded_vocab_size} embedding rows: export with the run's own tokenizer"
            )
        from_tok = {name: getattr(tok, name) for name in SPECIAL_TOKEN_IDS}
        if known is not None and any(known.get(k) != v for k, v in from_tok.items()):
            raise ValueError(
                f"the tokenizer {tokenizer_dir} has special-token ids {from_tok}, but the checkpoint recorded "
                f"{known}: export with the tokenizer the model was trained with"
            )
        known = from_tok
        im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    ids = {name: (known or {}).get(name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config.update(ids)
    if known is not None:
        stop = [ids["eos_token_id"]] if ids["eos_token_id"] is not None else []
        if im_end is not None and im_end not in stop:
            stop.append(im_end)  # a chat turn ends there
        generation.update(ids, eos_token_id=stop[0] if len(stop) == 1 else stop or None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_weights(tmp / "model.safetensors", sd)
        if generation:
            from transformers import GenerationConfig

            GenerationConfig(**generation).save_pretrained(str(tmp))
        if tok is not None:
            # Mamba takes no token_type_ids: generate(**tokenizer(text)) would refuse them.
            tok.model_input_names = ["input_ids", "attention_mask"]
            tok.init_kwargs["model_input_names"] = tok.model_input_names  # saved in tokenizer_config.json
            tok.save_pretrained(str(tmp))
    return out_dir


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


def _load_tokenizer(tokenizer_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises OSError, ValueError or its own types
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Loading: configs and weights as mamba_ssm and HF transformers write them.
#
# A mamba_ssm config.json is ``MambaConfig.__dict__``: ``ssm_cfg`` and ``attn_cfg`` hold only the
# keyword arguments their author passed; everything else is a constructor default, and those
# differ by layer type (Mamba-2's d_state is 128, Mamba-1's 16). The tables below are the
# defaults of mamba_ssm 2.3.1 (models/config_mamba.py, modules/mamba_simple.py Mamba,
# modules/mamba2.py Mamba2, modules/mha.py MHA), read from its source.

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
# Settings that choose a kernel or a parallel layout, never the numbers.
SPEED_ONLY = {"use_fast_path", "use_mem_eff_path", "sequence_parallel", "fused_add_norm"}


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


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """Our config from an HF ``config.json`` (model_type mamba or mamba2), with HF's own defaults.

    Every HF field that changes the numbers is honoured or refused; the rest (token ids,
    ``use_cache``, ``use_mambapy``, ``torch_dtype``, ...) do not change what the model computes.
    """
    from transformers import FalconMambaConfig as HFFalconMambaConfig
    from transformers import Mamba2Config as HFMamba2Config
    from transformers import MambaConfig as HFMambaConfig

    from handover.bamba import config_from_bamba, refuse_other_hybrid

    model_type = raw.get("model_type")
    refuse_other_hybrid(str(model_type), source)
    if model_type == "bamba":
        return config_from_bamba(raw, source)
    classes = {"mamba": HFMambaConfig, "mamba2": HFMamba2Config, "falcon_mamba": HFFalconMambaConfig}
    if model_type not in classes:
        raise UnsupportedCheckpoint(
            f"{source}: model_type={model_type!r}: only HF's 'mamba' (MambaForCausalLM), 'mamba2' "
            "(Mamba2ForCausalLM) and 'falcon_mamba' (FalconMambaForCausalLM) load here"
        )
    try:
        hf = classes[model_type].from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise UnsupportedCheckpoint(f"{source}: transformers refuses this config: {exc}") from exc
    if hf.hidden_act not in ("silu", "swish"):
        require(hf.hidden_act, "silu", "hidden_act", "Mamba's activation is SiLU", source)
    expand = integral_expand(hf.expand, "expand", source)
    vocab = hf.vocab_size
    ssm: dict[str, Any] = dict(
        d_state=hf.state_size,
        d_conv=hf.conv_kernel,
        expand=expand,
        bias=hf.use_bias,
        conv_bias=hf.use_conv_bias,
        dt_min=hf.time_step_min,
        dt_max=hf.time_step_max,
        dt_init_floor=hf.time_step_floor,
    )
    if model_type in ("mamba", "falcon_mamba"):
        ssm.update(
            layer="mamba1",
            dt_rank=hf.time_step_rank,
            dt_scale=hf.time_step_scale,
            dt_init=hf.time_step_init_scheme,
        )
        if model_type == "falcon_mamba":
            ssm.update(b_c_dt_rms=True, b_c_dt_rms_eps=hf.mixer_rms_eps)
    else:
        if hf.num_heads * hf.head_dim != expand * hf.hidden_size:
            raise UnsupportedCheckpoint(
                f"{source}: num_heads * head_dim = {hf.num_heads * hf.head_dim} != expand * hidden_size "
                f"= {expand * hf.hidden_size}"
            )
        limit = [float(v) for v in hf.time_step_limit]
        require(limit, [0.0, math.inf], "time_step_limit", "clamping dt after the softplus", source)
        ssm.update(
            layer="mamba2",
            headdim=hf.head_dim,
            ngroups=hf.n_groups,
            chunk_size=hf.chunk_size,
            # HF's gated norm: the model's layer_norm_epsilon, over all d_inner channels at once.
            gated_norm_eps=hf.layer_norm_epsilon,
            gated_norm_per_group=hf.n_groups == 1,
        )
    try:
        return MambaConfig(
            d_model=hf.hidden_size,
            n_layer=hf.num_hidden_layers,
            vocab_size=vocab,
            pad_vocab_size_multiple=8 if vocab % 8 == 0 else 1,
            norm_epsilon=hf.layer_norm_epsilon,
            residual_in_fp32=hf.residual_in_fp32,
            tie_embeddings=hf.tie_word_embeddings,
            initializer_range=hf.initializer_range,
            rescale_prenorm_residual=hf.rescale_prenorm_residual,
            ssm=SSMConfig(**ssm),
        )
    except ValueError as exc:
        raise UnsupportedCheckpoint(f"{source}: {exc}") from exc


def is_hf_config(raw: dict[str, Any]) -> bool:
    """HF configs name their ``model_type``; mamba_ssm's ``MambaConfig.__dict__`` never does."""
    return "model_type" in raw


def _read_weights(path: Path) -> dict[str, Tensor]:
    """Every weight file of a model folder, memory-mapped and verified (handover.reader)."""
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    for index_name, reader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", read_torch_weights),
    ):
        index = path / index_name
        if index.is_file():
            sd: dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                sd.update(reader(path / shard))
            return sd
    if (path / "pytorch_model.bin").is_file():
        return read_torch_weights(path / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{path} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin(.index.json)"
    )


def read_pretrained(path: str | Path) -> tuple[MambaConfig, dict[str, Tensor], str]:
    """Config and weights (our parameter names) of a local HF or mamba_ssm directory, and its format."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not an HF or mamba_ssm model directory")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    is_hf = is_hf_config(raw)
    cfg = config_from_hf(raw, str(config_path)) if is_hf else config_from_mamba_ssm(raw, str(config_path))
    sd = _read_weights(path)
    if is_hf and raw.get("model_type") == "bamba":
        from handover.bamba import bamba_state_dict_to_ours

        sd = bamba_state_dict_to_ours(sd, cfg)
    if is_hf and HF_EMBEDDING in sd:
        sd[OUR_EMBEDDING] = sd.pop(HF_EMBEDDING)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd, "hf" if is_hf else "mamba_ssm"


def load_weights(model: MambaLMHeadModel, sd: dict[str, Tensor], source: str) -> None:
    """Load a complete state dict (tied head optional), naming every mismatch."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if k in expected and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source}: weights do not match the config: missing {missing}, unexpected {unexpected}, "
            f"shapes {wrong}"
        )
    assign_weights(model, sd)


def load_pretrained(path: str | Path, **overrides: Any) -> MambaLMHeadModel:
    """Load an HF transformers or mamba_ssm directory into ``MambaLMHeadModel`` (fp32, CPU).

    ``overrides`` replace config fields (e.g. ``impl="torch"``).
    """
    cfg, sd, _ = read_pretrained(path)
    if overrides:
        cfg = replace(cfg, **overrides)
    with torch.device("meta"):
        model = MambaLMHeadModel(cfg)
    load_weights(model, sd, str(path))
    return model
