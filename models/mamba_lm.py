"""The Mamba language model, top-down: norms -> mixers -> MLP -> block -> backbone -> LM head.

Module and parameter names are mamba_ssm's (``MambaLMHeadModel``: ``backbone.embedding``,
``backbone.layers.{i}.norm/mixer/norm2/mlp``, ``backbone.norm_f``, ``lm_head``), so a state
dict maps 1:1 onto mamba_ssm checkpoints and, renaming ``embedding`` to ``embeddings``, onto
HF transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (handover/hf_mamba.py).

Every mixer runs either the mamba_ssm / causal_conv1d CUDA kernels or the PyTorch operators
of ``models/ops.py`` over the same parameters (``models/kernels.py`` picks per forward).
All initialisation lives in ``MambaLMHeadModel.param_init_fn`` (Composer's hook for models
built on the meta device under FSDP), so meta + init equals eager construction.

Shapes: b batch, l sequence, D d_model, E d_inner, N d_state, K d_conv, R dt_rank,
H Mamba-2 heads, P head dim, G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import ops
from models.config import MambaConfig
from models.kernels import load_kernels, use_kernels

# mamba_ssm's GatedMLP rounds its hidden width up to a multiple of 128.
MLP_MULTIPLE_OF = 128


# ----------------------------------------------------------------------------------------------
# Inference cache: per-layer recurrent state, so generation costs O(1) per token for SSM layers.


@dataclass
class InferenceCache:
    """Recurrent state of every layer for token-by-token generation.

    Mamba-1 layers keep (conv_state (b, E, K), ssm_state (b, E, N)); Mamba-2 layers keep
    (conv_state (b, E + 2GN, K), ssm_state (b, H, P, N)); attention layers keep
    (k (b, max_seqlen, h_kv, d), v (same)). ``seqlen_offset`` counts tokens already consumed.
    """

    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    states: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (mamba_ssm's rms_norm_ref), returned in the input dtype."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(d))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dimension, in float32, without a weight; returned in x's dtype.

    Falcon-Mamba's norm of dt, B and C (HF transformers' ``rms_forward``).
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) over groups of ``group_size`` channels."""

    def __init__(self, d: int, eps: float, group_size: int) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.empty(d))

    def forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        return ops.rms_norm_gated(x, z, self.weight, self.eps, self.group_size)


def make_norm(cfg: MambaConfig) -> nn.Module:
    return (
        RMSNorm(cfg.d_model, cfg.norm_epsilon)
        if cfg.rms_norm
        else nn.LayerNorm(cfg.d_model, cfg.norm_epsilon)
    )


# ----------------------------------------------------------------------------------------------
# Mixers


class Mamba1Mixer(nn.Module):
    """Mamba-1 selective SSM (Gu & Dao 2023), mamba_ssm's ``Mamba`` module.

    With ``ssm.b_c_dt_rms`` it is Falcon-Mamba's mixer (Zuo et al. 2024, arXiv:2410.05355): dt, B
    and C leave ``x_proj`` RMS-normalised, which TII reports keeps large-scale training stable.
    Both paths (kernels and PyTorch) apply the norm in ``_ssm_inputs`` before the scan, so they
    compute one function. It is HF ``FalconMambaMixer``'s inference definition: dt is normalised
    over its dt_rank channels *before* ``dt_proj``. (mamba_ssm's fused ``mamba_inner_fn``, which HF
    calls only when training on CUDA, normalises dt *after* ``dt_proj`` over d_inner: a different
    function; it is not used here.)
    """

    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        s = cfg.ssm
        self.layer_idx = layer_idx
        self.impl = cfg.impl
        self.b_c_dt_rms_eps = s.b_c_dt_rms_eps if s.b_c_dt_rms else None
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = cfg.d_inner, s.d_state, s.d_conv, cfg.dt_rank
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * E, bias=s.bias)
        self.conv1d = nn.Conv1d(E, E, s.d_conv, groups=E, padding=s.d_conv - 1, bias=s.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.dt_proj.init_role = "dt_proj"
        self.A_log = nn.Parameter(torch.empty(E, N))  # A = -exp(A_log), S4D-real init
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, cfg.d_model, bias=s.bias)
        self.out_proj.init_role = "residual_out"

    def allocate_cache(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32, device=device)
        return conv, ssm

    def forward(
        self, h: Tensor, cache: InferenceCache | None = None, seq_idx: Tensor | None = None
    ) -> Tensor:
        if seq_idx is not None:
            raise ValueError(
                "resetting the state at document boundaries needs Mamba-2 layers (mamba_ssm's selective "
                "scan has no seq_idx); set model.ssm.layer=mamba2 or turn reset_state_at_doc_boundaries off"
            )
        if cache is not None and cache.seqlen_offset > 0:
            return torch.stack([self.step(h_t, cache) for h_t in h.unbind(1)], dim=1)
        seqlen = h.shape[1]
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (b, E, l) each
        if cache is not None:
            cache.states[self.layer_idx][0].copy_(F.pad(x, (self.d_conv - seqlen, 0))[..., -self.d_conv :])
        kernels = use_kernels(self.impl, h)
        conv_w = self.conv1d.weight.squeeze(1)  # (E, K)
        if kernels:
            x = load_kernels().causal_conv1d_fn(x, conv_w, self.conv1d.bias, activation="silu")
        else:
            x = ops.causal_conv1d(x, conv_w, self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (b, E, l); bias added inside the scan
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, N, l)
        A = -torch.exp(self.A_log.float())
        scan = load_kernels().selective_scan_fn if kernels else ops.selective_scan
        out = scan(
            x,
            dt,
            A,
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=cache is not None,
        )
        if cache is not None:
            y, last_state = out
            cache.states[self.layer_idx][1].copy_(last_state)
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., E) -> dt (..., R), B (..., N), C (..., N); RMS-normalised for Falcon-Mamba."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.b_c_dt_rms_eps is not None:
            eps = self.b_c_dt_rms_eps
            dt, B, C = rms_normalize(dt, eps), rms_normalize(B, eps), rms_normalize(C, eps)
        return dt, B, C

    def step(self, h: Tensor, cache: InferenceCache) -> Tensor:
        """One token: h (b, D) -> (b, D), updating this layer's cache in place."""
        conv_state, ssm_state = cache.states[self.layer_idx]
        x, z = self.in_proj(h).chunk(2, dim=-1)
        x = ops.causal_conv1d_step(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt, B, C = self._ssm_inputs(x)
        dt = dt @ self.dt_proj.weight.t()
        A = -torch.exp(self.A_log.float())
        y = ops.selective_state_update(
            ssm_state, x, dt, A, B, C, self.D, z, dt_bias=self.dt_proj.bias, dt_softplus=True
        )
        return self.out_proj(y)


class Mamba2Mixer(nn.Module):
    """Mamba-2 SSD mixer (Dao & Gu 2024), mamba_ssm's ``Mamba2`` module without its optional MLP split."""

    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        s = cfg.ssm
        self.layer_idx = layer_idx
        self.impl = cfg.impl
        self.d_inner, self.d_state, self.d_conv = cfg.d_inner, s.d_state, s.d_conv
        self.nheads, self.headdim, self.ngroups, self.chunk_size = (
            cfg.nheads,
            s.headdim,
            s.ngroups,
            s.chunk_size,
        )
        E, N, G, H = self.d_inner, self.d_state, self.ngroups, self.nheads
        self.conv_dim = E + 2 * G * N
        # in_proj output is [z (E), xBC (E + 2GN), dt (H)], mamba_ssm's order.
        self.in_proj = nn.Linear(cfg.d_model, 2 * E + 2 * G * N + H, bias=s.bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            s.d_conv,
            groups=self.conv_dim,
            padding=s.d_conv - 1,
            bias=s.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        # Per group as mamba_ssm (eps fixed at 1e-5), or over all channels as HF transformers' Mamba2.
        self.norm = GatedRMSNorm(E, s.gated_norm_eps, group_size=E // G if s.gated_norm_per_group else E)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=s.bias)
        self.out_proj.init_role = "residual_out"

    def allocate_cache(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, dtype=dtype, device=device)
        ssm = torch.zeros(
            batch_size, self.nheads, self.headdim, self.d_state, dtype=torch.float32, device=device
        )
        return conv, ssm

    def forward(
        self, h: Tensor, cache: InferenceCache | None = None, seq_idx: Tensor | None = None
    ) -> Tensor:
        """``seq_idx`` (b, l): document index of each position; the conv and SSM states restart at
        each new document (mamba_ssm's ``seq_idx``)."""
        if cache is not None and cache.seqlen_offset > 0:
            return torch.stack([self.step(h_t, cache) for h_t in h.unbind(1)], dim=1)
        b, seqlen, _ = h.shape
        z, xBC, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (b, E + 2GN, l)
        if cache is not None:
            cache.states[self.layer_idx][0].copy_(F.pad(xBC, (self.d_conv - seqlen, 0))[..., -self.d_conv :])
        kernels = use_kernels(self.impl, h)
        conv_w = self.conv1d.weight.squeeze(1)
        if kernels:
            seq_idx_k = seq_idx.to(torch.int32) if seq_idx is not None else None
            xBC = load_kernels().causal_conv1d_fn(
                xBC, conv_w, self.conv1d.bias, seq_idx=seq_idx_k, activation="silu"
            )
        else:
            xBC = ops.causal_conv1d(xBC, conv_w, self.conv1d.bias, seq_idx=seq_idx)
        x, B, C = xBC.transpose(1, 2).split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        x = x.reshape(b, seqlen, self.nheads, self.headdim)
        B = B.reshape(b, seqlen, self.ngroups, self.d_state)
        C = C.reshape(b, seqlen, self.ngroups, self.d_state)
        A = -torch.exp(self.A_log.float())
        if kernels:
            out = load_kernels().mamba_chunk_scan_combined(
                x,
                dt,
                A,
                B,
                C,
                self.chunk_size,
                D=self.D.float(),
                dt_bias=self.dt_bias.float(),
                dt_softplus=True,
                seq_idx=seq_idx_k,
                return_final_states=cache is not None,
            )
        else:
            out = ops.ssd_chunked_scan(
                x,
                dt,
                A,
                B,
                C,
                self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                return_final_state=cache is not None,
                seq_idx=seq_idx,
            )
        if cache is not None:
            y, final_state = out
            cache.states[self.layer_idx][1].copy_(final_state)
        else:
            y = out
        y = self.norm(y.reshape(b, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def step(self, h: Tensor, cache: InferenceCache) -> Tensor:
        """One token: h (b, D) -> (b, D), updating this layer's cache in place."""
        conv_state, ssm_state = cache.states[self.layer_idx]
        b = h.shape[0]
        z, xBC, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = ops.causal_conv1d_step(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y = ops.ssd_state_update(
            ssm_state,
            x.reshape(b, self.nheads, self.headdim),
            dt,
            A,
            B.reshape(b, self.ngroups, self.d_state),
            C.reshape(b, self.ngroups, self.d_state),
            self.D,
        )
        return self.out_proj(self.norm(y.reshape(b, self.d_inner), z))


def apply_rotary(x: Tensor, positions: Tensor, rotary_dim: int, base: float) -> Tensor:
    """Rotary embedding on the first ``rotary_dim`` channels, halves layout (GPT-NeoX; flash_attn interleaved=False).

    x: (b, l, h, d); positions: (l,).
    """
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    )
    angles = positions.float()[:, None] * inv_freq  # (l, rotary_dim / 2)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention: mamba_ssm's ``MHA`` parameters."""

    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        a = cfg.attn
        self.layer_idx = layer_idx
        self.num_heads, self.num_heads_kv, self.head_dim = (
            a.num_heads,
            cfg.attn_num_heads_kv,
            cfg.attn_head_dim,
        )
        self.rotary_dim, self.rotary_base = a.rotary_emb_dim, a.rotary_base
        qkv_dim = (self.num_heads + 2 * self.num_heads_kv) * self.head_dim
        self.in_proj = nn.Linear(cfg.d_model, qkv_dim, bias=a.qkv_proj_bias)
        self.out_proj = nn.Linear(self.num_heads * self.head_dim, cfg.d_model, bias=a.out_proj_bias)
        self.out_proj.init_role = "residual_out"

    def allocate_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, max_seqlen, self.num_heads_kv, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self, h: Tensor, cache: InferenceCache | None = None, seq_idx: Tensor | None = None
    ) -> Tensor:
        """``seq_idx`` (b, l): document index of each position; attention stays inside a document."""
        b, seqlen, _ = h.shape
        offset = cache.seqlen_offset if cache is not None else 0
        q, kv = self.in_proj(h).split(
            [self.num_heads * self.head_dim, 2 * self.num_heads_kv * self.head_dim], dim=-1
        )
        q = q.reshape(b, seqlen, self.num_heads, self.head_dim)
        k, v = kv.reshape(b, seqlen, 2, self.num_heads_kv, self.head_dim).unbind(2)
        if self.rotary_dim:
            positions = torch.arange(offset, offset + seqlen, device=h.device)
            q = apply_rotary(q, positions, self.rotary_dim, self.rotary_base)
            k = apply_rotary(k, positions, self.rotary_dim, self.rotary_base)
        if cache is not None:
            k_cache, v_cache = cache.states[self.layer_idx]
            if offset + seqlen > k_cache.shape[1]:
                raise ValueError(f"generation past the cache's max_seqlen={k_cache.shape[1]}")
            k_cache[:, offset : offset + seqlen] = k
            v_cache[:, offset : offset + seqlen] = v
            k, v = k_cache[:, : offset + seqlen], v_cache[:, : offset + seqlen]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, l, d)
        if self.num_heads_kv != self.num_heads:
            rep = self.num_heads // self.num_heads_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if seq_idx is not None:
            if cache is not None:
                raise ValueError("document-boundary masks are for training; generate one document at a time")
            same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, l, l)
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=h.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(same_doc & causal).unsqueeze(1))
        elif offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new queries at positions offset.. see every cached key up to themselves
            key_pos = torch.arange(k.shape[2], device=h.device)
            query_pos = torch.arange(offset, offset + seqlen, device=h.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_pos[None, :] <= query_pos[:, None])
        return self.out_proj(y.transpose(1, 2).reshape(b, seqlen, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """SwiGLU MLP after the mixer when ``d_intermediate > 0`` (mamba_ssm's ``GatedMLP``)."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        hidden = (cfg.d_intermediate + MLP_MULTIPLE_OF - 1) // MLP_MULTIPLE_OF * MLP_MULTIPLE_OF
        self.fc1 = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, cfg.d_model, bias=False)
        self.fc2.init_role = "residual_out"

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


# ----------------------------------------------------------------------------------------------
# Block, backbone, LM


class Block(nn.Module):
    """Add -> norm -> mix (-> add -> norm -> MLP), mamba_ssm's ``Block``.

    The residual stream is carried separately from the mixer output and kept in float32
    (``residual_in_fp32``), so bf16 mixers do not round the sum of many layers (mamba_ssm).
    """

    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = make_norm(cfg)
        kind = cfg.mixer_kind(layer_idx)
        self.mixer: nn.Module = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer, "attn": Attention}[kind](
            cfg, layer_idx
        )
        self.norm2 = make_norm(cfg) if cfg.d_intermediate > 0 else None
        self.mlp = GatedMLP(cfg) if cfg.d_intermediate > 0 else None

    def forward(
        self,
        hidden: Tensor,
        residual: Tensor | None,
        cache: InferenceCache | None = None,
        seq_idx: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        residual = hidden if residual is None else hidden + residual
        hidden = self.norm(residual.to(self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.float()
        hidden = self.mixer(hidden, cache, seq_idx)
        if self.mlp is not None:
            residual = hidden + residual
            hidden = self.norm2(residual.to(self.norm2.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.float()
            hidden = self.mlp(hidden)
        return hidden, residual


class MixerModel(nn.Module):
    """Embedding, the blocks, and the final norm (mamba_ssm's ``MixerModel``)."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)

    def forward(
        self, input_ids: Tensor, cache: InferenceCache | None = None, seq_idx: Tensor | None = None
    ) -> Tensor:
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cache, seq_idx)
        residual = hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


class MambaLMHeadModel(nn.Module):
    """A Mamba (Mamba-1, Mamba-2 or hybrid) causal language model."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = MixerModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.reset_parameters()

    # -- forward and generation ----------------------------------------------------------------

    def forward(
        self, input_ids: Tensor, cache: InferenceCache | None = None, seq_idx: Tensor | None = None
    ) -> Tensor:
        """input_ids (b, l) -> logits (b, l, padded_vocab_size).

        ``seq_idx`` (b, l), the document index of each position of a packed sample, restarts the
        recurrent state at each document (Mamba-2 and attention layers; off by default, as in the
        paper, where the state flows across documents).
        """
        _check_token_ids(input_ids, "forward")
        logits = self.lm_head(self.backbone(input_ids, cache, seq_idx))
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return logits

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None
    ) -> InferenceCache:
        device = self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        cache = InferenceCache(batch_size=batch_size, max_seqlen=max_seqlen)
        for i, layer in enumerate(self.backbone.layers):
            if isinstance(layer.mixer, Attention):
                cache.states[i] = layer.mixer.allocate_cache(batch_size, max_seqlen, dtype, device)
            else:
                cache.states[i] = layer.mixer.allocate_cache(batch_size, dtype, device)
        return cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
    ) -> Tensor:
        """Recurrent decoding: one prefill over the prompt, then one step per new token.

        ``temperature == 0`` is greedy; otherwise sample from softmax(logits / temperature)
        restricted to the ``top_k`` most likely tokens and the ``top_p`` nucleus. Sequences
        that produced ``eos_token_id`` keep emitting it. Only the first ``vocab_size`` tokens
        (default: the model's vocabulary) are candidates: a tokenizer smaller than the head (an HF
        export records the padded size) has no token for the rest. Returns (b, prompt + new) ids.
        """
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(
                "generate needs max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1, top_k >= 0"
            )
        _check_token_ids(input_ids, "generate")
        b, prompt_len = input_ids.shape
        vocab = min(vocab_size or self.config.vocab_size, self.config.vocab_size)
        cache = self.allocate_inference_cache(b, prompt_len + max_new_tokens)
        # The backbone fills each layer's state over the whole prompt; the head then reads only the
        # last position (self(input_ids, cache) would compute (length x vocab) logits first).
        hidden = self.backbone(input_ids, cache)
        cache.seqlen_offset += prompt_len
        logits = self.lm_head(hidden[:, -1])
        tokens = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            next_token = sample_next_token(logits[:, :vocab], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
                done |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            remaining = max_new_tokens - i - 1
            if remaining == 0:
                break
            if eos_token_id is not None and bool(done.all()):  # every row finished: pad, stop stepping
                tokens.append(next_token.new_full((b, remaining), eos_token_id))
                break
            logits = self(next_token[:, None], cache)[:, -1]
        return torch.cat(tokens, dim=1)

    # -- initialisation (Composer's param_init_fn), wrapping and weight decay --------------------

    def reset_parameters(self) -> None:
        self.apply(self.param_init_fn)

    @torch.no_grad()
    def param_init_fn(self, module: nn.Module) -> None:
        """Initialise ``module``'s own parameters (not its children's), reproducing mamba_ssm.

        Linear layers with a special initialisation carry an ``init_role`` attribute set where
        they are built ("dt_proj", "residual_out"); attributes of modules survive Composer's
        ``to_empty`` where parameter attributes (mamba_ssm's ``_no_reinit``) do not.

        Composer calls this on every module after materialising meta-device parameters under
        FSDP; ``reset_parameters`` applies it to every module of an eagerly built model.
        mamba_ssm's choices: embedding N(0, 0.02); Linear weights keep PyTorch's default
        (kaiming-uniform, a=sqrt(5)) and biases are zeroed; each residual branch's output
        projection (mixer ``out_proj``, MLP ``fc2``) is divided by sqrt(n_layer) (GPT-2's
        prenorm-residual scaling, as mamba_ssm's last ``_init_weights`` pass leaves it); Mamba-1
        ``dt_proj`` and all ``A_log``, ``D``, ``dt_bias`` follow the Mamba papers' S4D-real and
        log-uniform-dt initialisation.
        """
        cfg = self.config
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, nn.Linear):
            if module is self.lm_head and cfg.tie_embeddings:
                return  # the embedding owns the tied weight
            role = getattr(module, "init_role", None)
            if role == "dt_proj":
                self._init_dt_proj(module)
                return
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            if cfg.rescale_prenorm_residual and role == "residual_out":
                # mamba_ssm's final value: MixerModel.__init__ applies _init_weights with
                # n_residuals_per_layer=2 when there are MLPs, then MambaLMHeadModel.__init__ applies
                # it again with the default 1, re-drawing out_proj/fc2: the last call wins, so the
                # scale is 1/sqrt(n_layer) with or without MLPs (mixer_seq_simple.py, 2.3.1).
                module.weight.div_(math.sqrt(cfg.n_layer))
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Mamba1Mixer):
            # S4D-real: A[e, n] = -(n + 1) for every channel e.
            A = torch.arange(1, module.d_state + 1, dtype=torch.float32).repeat(module.d_inner, 1)
            _copy_full_(module.A_log, torch.log(A))
            nn.init.ones_(module.D)
        elif isinstance(module, Mamba2Mixer):
            s = cfg.ssm
            module.A_log.uniform_(s.A_init_min, s.A_init_max).log_()
            nn.init.ones_(module.D)
            _inverse_softplus_dt_(module.dt_bias, s.dt_min, s.dt_max, s.dt_init_floor)

    def _init_dt_proj(self, dt_proj: nn.Linear) -> None:
        s = self.config.ssm
        std = self.config.dt_rank**-0.5 * s.dt_scale
        if s.dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        else:
            nn.init.uniform_(dt_proj.weight, -std, std)
        _inverse_softplus_dt_(dt_proj.bias, s.dt_min, s.dt_max, s.dt_init_floor)

    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """One FSDP unit per block (the paper: the default single unit is much slower)."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Recompute each block's activations in backward (the paper's block-wise recomputation)."""
        return isinstance(module, Block)


def _check_token_ids(input_ids: Tensor, where: str) -> None:
    """Token ids must be (batch, seq_len) with both at least 1: anything else fails later, inside a conv."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        hint = " (a 1-D tensor of ids: use ids[None] for a batch of one)" if input_ids.dim() == 1 else ""
        raise ValueError(
            f"{where} expects input_ids of shape (batch, seq_len) with batch >= 1 and seq_len >= 1, "
            f"got shape {tuple(input_ids.shape)}{hint}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"{where} expects integer token ids, got dtype {input_ids.dtype}")


def _copy_full_(param: Tensor, full: Tensor) -> None:
    """Write a full-size tensor into ``param``, which may be an FSDP2-sharded DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def _inverse_softplus_dt_(bias: Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored (Mamba, section 3.6)."""
    bias.uniform_(0.0, 1.0)
    bias.mul_(math.log(dt_max) - math.log(dt_min)).add_(math.log(dt_min)).exp_().clamp_(min=floor)
    # softplus^-1(y) = y + log(1 - exp(-y)), computed stably with expm1.
    bias.add_(torch.log(-torch.expm1(-bias)))


def sample_next_token(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Pick one token per row of logits (b, V): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
