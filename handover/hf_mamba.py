"""HF transformers' Mamba formats: ``MambaForCausalLM``, ``Mamba2ForCausalLM`` and the HF folder itself.

- ``export_hf``: a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads
  offline: config.json, model.safetensors and, when given, the tokenizer files. The class follows
  the model: ``MambaForCausalLM`` for Mamba-1, ``Mamba2ForCausalLM`` for Mamba-2 (both here),
  ``FalconMambaForCausalLM`` for Mamba-1 with ``ssm.b_c_dt_rms`` (handover/falcon_mamba.py),
  ``BambaForCausalLM`` for hybrids (handover/bamba.py). HF's Mamba state-dict names equal ours
  except ``backbone.embedding`` -> ``backbone.embeddings``.
- ``config_from_hf``: our config from an HF ``config.json``, chosen by its ``model_type`` among the
  same classes; every other hybrid family is refused by name.

Reading a folder's weights (this format or mamba_ssm's, handover/mamba_ssm.py) is
``handover.weights.read_pretrained``. Directories are written under a temporary name and renamed,
so an interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor

from common.io import atomic_dir
from handover.bamba import (
    bamba_config_dict,
    bamba_state_dict_to_ours,
    config_from_bamba,
    ours_to_bamba_state_dict,
    refuse_other_hybrid,
)
from handover.falcon_mamba import falcon_mamba_config_fields, falcon_mamba_ssm_fields
from handover.unsupported import UnsupportedCheckpoint, integral_expand, require
from models.config import MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

HF_EMBEDDING = "backbone.embeddings.weight"
OUR_EMBEDDING = "backbone.embedding.weight"


def hf_config_dict(cfg: MambaConfig) -> dict[str, Any]:
    """The HF ``MambaConfig`` / ``FalconMambaConfig`` / ``Mamba2Config`` fields equivalent to ``cfg``, or
    ``BambaConfig``'s for a hybrid (attention layers or MLPs); raises naming what none can hold."""
    if cfg.attn_layer_idx or cfg.d_intermediate:
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
        return {**mamba1, **falcon_mamba_config_fields(cfg)} if s.b_c_dt_rms else mamba1
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


def state_dict_from_hf(sd: dict[str, Tensor], model_type: str, cfg: MambaConfig) -> dict[str, Tensor]:
    """An HF checkpoint's tensors (``model_type`` as its config.json names it) under our names."""
    if model_type == "bamba":
        return bamba_state_dict_to_ours(sd, cfg)
    if HF_EMBEDDING in sd:
        sd[OUR_EMBEDDING] = sd.pop(HF_EMBEDDING)
    return sd


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


def _load_tokenizer(tokenizer_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # transformers raises OSError, ValueError or its own types
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """Our config from an HF ``config.json`` (model_type mamba or mamba2), with HF's own defaults.

    Every HF field that changes the numbers is honoured or refused; the rest (token ids,
    ``use_cache``, ``use_mambapy``, ``torch_dtype``, ...) do not change what the model computes.
    """
    from transformers import FalconMambaConfig as HFFalconMambaConfig
    from transformers import Mamba2Config as HFMamba2Config
    from transformers import MambaConfig as HFMambaConfig

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
            ssm.update(falcon_mamba_ssm_fields(hf))
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
