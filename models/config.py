"""Model configuration: mamba_ssm's field names, cross-field checks, and named size presets.

Field names follow ``mamba_ssm.models.config_mamba.MambaConfig`` (``d_model``, ``n_layer``,
``ssm``/``ssm_cfg``, ``attn_layer_idx``/``attn_cfg``, ...) so that a config maps 1:1 onto
mamba_ssm checkpoints and, for pure Mamba-1/Mamba-2 models, onto HF transformers.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, replace
from typing import Literal

from common.config import report

Mixer = Literal["mamba1", "mamba2"]
Impl = Literal["auto", "torch", "kernels"]
MIXERS: tuple[str, ...] = typing.get_args(Mixer)
IMPLS: tuple[str, ...] = typing.get_args(Impl)


@dataclass
class SSMConfig:
    """The state-space mixer (``ssm_cfg`` in mamba_ssm)."""

    layer: Mixer = "mamba1"  # mamba1 (selective scan, Gu & Dao 2023) | mamba2 (SSD, Dao & Gu 2024)
    d_state: int = 16  # N; mamba_ssm default 16 for Mamba-1, 128 for Mamba-2
    d_conv: int = 4  # K, depthwise causal conv width
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int | None = None  # Mamba-1 only; None = ceil(d_model / 16) ("auto")
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init: Literal["random", "constant"] = "random"  # Mamba-1 dt_proj.weight init
    dt_scale: float = 1.0
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0  # Mamba-2: A ~ U[A_init_min, A_init_max] per head
    A_init_max: float = 16.0
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj biases
    headdim: int = 64  # Mamba-2: P
    ngroups: int = 1  # Mamba-2: G groups of B/C shared by nheads / G heads
    chunk_size: int = 256  # Mamba-2 SSD chunk length
    # Mamba-2's gated output norm. mamba_ssm fixes its eps at 1e-5 and normalises each of the
    # ngroups groups of d_inner / ngroups channels; HF transformers' Mamba2 (4.5x) uses the
    # model's layer_norm_epsilon and normalises all d_inner channels at once. Both are
    # representable so that checkpoints of either library load with their own numbers.
    gated_norm_eps: float = 1e-5
    gated_norm_per_group: bool = True
    # Falcon-Mamba (TII 2024; HF's FalconMambaForCausalLM): Mamba-1 whose dt (before dt_proj), B
    # and C are RMS-normalised, without weights, each over its own channels, eps b_c_dt_rms_eps
    # (HF's mixer_rms_eps). Names: mamba_ssm's mamba_inner_fn arguments.
    b_c_dt_rms: bool = False
    b_c_dt_rms_eps: float = 1e-6

    def __post_init__(self) -> None:
        problems = []
        if self.layer not in MIXERS:  # checked here too for configs built in Python
            problems.append(f"model.ssm.layer={self.layer!r} is not one of {MIXERS}")
        if not 0 < self.dt_min <= self.dt_max:
            problems.append(
                f"model.ssm.dt_min={self.dt_min} and dt_max={self.dt_max} need 0 < dt_min <= dt_max"
            )
        if not 0 < self.A_init_min <= self.A_init_max:
            problems.append("model.ssm.A_init_min/A_init_max need 0 < A_init_min <= A_init_max")
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"model.ssm.{name}={getattr(self, name)} must be >= 1")
        if self.gated_norm_eps <= 0:
            problems.append(f"model.ssm.gated_norm_eps={self.gated_norm_eps} must be > 0")
        if self.b_c_dt_rms_eps <= 0:
            problems.append(f"model.ssm.b_c_dt_rms_eps={self.b_c_dt_rms_eps} must be > 0")
        if self.b_c_dt_rms and self.layer != "mamba1":
            problems.append(
                f"model.ssm.b_c_dt_rms=true is Falcon-Mamba's Mamba-1 mixer; model.ssm.layer={self.layer!r} "
                "has no separate dt/B/C projection: set layer mamba1 or b_c_dt_rms false"
            )
        if self.dt_rank is not None and self.dt_rank < 1:
            problems.append(f"model.ssm.dt_rank={self.dt_rank} must be >= 1 (or null for ceil(d_model/16))")
        report(problems)


@dataclass
class AttnConfig:
    """Causal self-attention layers of a hybrid model (``attn_cfg`` in mamba_ssm's MHA)."""

    num_heads: int = 8
    num_heads_kv: int | None = None  # None = num_heads (MHA); fewer = GQA
    head_dim: int | None = None  # None = d_model // num_heads
    rotary_emb_dim: int = 0  # 0 = no positional encoding (the Mamba-2-Hybrid recipe works without)
    rotary_base: float = 10000.0
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        kv = self.num_heads if self.num_heads_kv is None else self.num_heads_kv
        if self.num_heads < 1 or kv < 1 or self.num_heads % kv:
            problems.append(
                f"model.attn.num_heads={self.num_heads} must be a positive multiple of num_heads_kv={kv}"
            )
        if self.rotary_emb_dim % 2:
            problems.append(f"model.attn.rotary_emb_dim={self.rotary_emb_dim} must be even")
        report(problems)


@dataclass
class MambaConfig:
    d_model: int = 64
    n_layer: int = 2
    vocab_size: int = 512
    pad_vocab_size_multiple: int = 8  # embedding rows padded up to a multiple (mamba_ssm: 8)
    d_intermediate: int = 0  # gated MLP width after each mixer; 0 = no MLP (pure Mamba)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    attn_layer_idx: list[int] = field(default_factory=list)  # layers that use attention instead
    attn: AttnConfig = field(default_factory=AttnConfig)
    rms_norm: bool = True  # RMSNorm (mamba_ssm default) or LayerNorm
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = False  # Mambaoutai unties the head (paper, section 3.1)
    initializer_range: float = 0.02  # embedding std
    rescale_prenorm_residual: bool = True  # out_proj/fc2 scaled by 1/sqrt(n_layer) (mamba_ssm)
    impl: Impl = "auto"  # auto: mamba_ssm kernels on CUDA when installed, else PyTorch | torch | kernels

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            if getattr(self, name) < 1:
                problems.append(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.d_intermediate < 0:
            problems.append(f"model.d_intermediate={self.d_intermediate} must be >= 0 (0 = no MLP)")
        if self.impl not in IMPLS:  # checked here too for configs built in Python
            problems.append(f"model.impl={self.impl!r} is not one of {IMPLS}")
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad:
            problems.append(f"model.attn_layer_idx has {bad} outside [0, n_layer={self.n_layer})")
        if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            problems.append(f"model.attn_layer_idx={self.attn_layer_idx} has duplicates")
        ssm_ok = (
            self.d_model >= 1 and self.ssm.expand >= 1 and self.ssm.headdim >= 1 and self.ssm.ngroups >= 1
        )
        if self.ssm.layer == "mamba2" and ssm_ok:
            if self.d_inner % self.ssm.headdim:
                problems.append(
                    f"model.ssm.headdim={self.ssm.headdim} must divide d_inner = expand * d_model = {self.d_inner}"
                )
            elif self.nheads % self.ssm.ngroups:
                problems.append(
                    f"model.ssm.ngroups={self.ssm.ngroups} must divide the number of heads {self.nheads}"
                )
        heads_ok = self.attn.num_heads >= 1
        if (
            self.attn_layer_idx
            and self.attn.head_dim is None
            and heads_ok
            and self.d_model % self.attn.num_heads
        ):
            problems.append(
                f"model.attn.num_heads={self.attn.num_heads} must divide d_model={self.d_model} "
                "(or set model.attn.head_dim)"
            )
        elif self.attn_layer_idx and heads_ok and self.attn.rotary_emb_dim > self.attn_head_dim:
            problems.append(
                f"model.attn.rotary_emb_dim={self.attn.rotary_emb_dim} is larger than the head dimension "
                f"{self.attn_head_dim}: set it to at most {self.attn_head_dim} (rotary acts within a head)"
            )
        report(problems)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def d_inner(self) -> int:
        return self.ssm.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return self.ssm.dt_rank if self.ssm.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def nheads(self) -> int:
        """Mamba-2 heads (d_inner / headdim)."""
        return self.d_inner // self.ssm.headdim

    @property
    def attn_head_dim(self) -> int:
        return self.attn.head_dim or self.d_model // self.attn.num_heads

    @property
    def attn_num_heads_kv(self) -> int:
        return self.attn.num_heads_kv or self.attn.num_heads

    def mixer_kind(self, layer_idx: int) -> str:
        return "attn" if layer_idx in self.attn_layer_idx else self.ssm.layer


# Named sizes (torchtitan-style flavors). A recipe picks one with `model.preset` and may
# override any field. Shapes: mamba_ssm's released models (130m, 370m; Gu & Dao 2023, table 12)
# and LightOn's Mambaoutai (d_model 2688, 28 layers, 64k vocab, untied head; paper section 3.1).
PRESETS: dict[str, MambaConfig] = {
    "debug": MambaConfig(d_model=64, n_layer=2, vocab_size=512, ssm=SSMConfig(d_state=8)),
    "130m": MambaConfig(d_model=768, n_layer=24, vocab_size=50277, tie_embeddings=True),
    "370m": MambaConfig(d_model=1024, n_layer=48, vocab_size=50277, tie_embeddings=True),
    # The paper's ablation model ("0.5B ... the architecture of the original Mamba", 64k vocab,
    # untied): the 370m body, deeper, with the 64k untied head: 0.50B parameters.
    "0.5b": MambaConfig(d_model=1024, n_layer=56, vocab_size=65024),
    "1.6b": MambaConfig(d_model=2688, n_layer=28, vocab_size=65024),
    "debug-mamba2": MambaConfig(
        d_model=64,
        n_layer=2,
        vocab_size=512,
        ssm=SSMConfig(layer="mamba2", d_state=16, headdim=16, chunk_size=16),
    ),
    "debug-hybrid": MambaConfig(
        d_model=64,
        n_layer=3,
        vocab_size=512,
        d_intermediate=128,
        ssm=SSMConfig(layer="mamba2", d_state=16, headdim=16, chunk_size=16),
        attn_layer_idx=[1],
        attn=AttnConfig(num_heads=4, rotary_emb_dim=8),
    ),
}


def preset(name: str, **overrides: object) -> MambaConfig:
    """A named preset with optional field overrides (``preset("debug", n_layer=4)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
