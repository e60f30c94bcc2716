"""Model FLOPs per token, for MFU (Composer's SpeedMonitor reads ``flops_per_batch``).

Forward FLOPs per token, counting a multiply-add as 2 (E d_inner, R dt_rank, N d_state,
K d_conv, D d_model, V padded vocab, L sequence length):

- Mamba-1 block: in_proj 4DE, conv 2EK, x_proj 2E(R + 2N), dt_proj 2RE, scan 9EN, out_proj 2ED
  (the selective-scan count of Gu & Dao's reference; LightOn's and nanotron's code write 9DN).
- Mamba-2 block (Megatron-LM's count, G groups, H heads): 2D(2E + 2GN + H) + 7EN + 2ED.
- Attention: qkv 2D(h + 2h_kv)d_h, scores and values 4 h d_h L (no causal halving, as PaLM),
  out_proj 2 h d_h D.  Gated MLP: 6 D d_ff.  LM head 2DV (the embedding lookup is free).

Training = 3 x forward (backward = 2 x forward); recomputation is not counted (MFU, not HFU).
Check: Mambaoutai 1.6B is about 2.91 GFLOP/token forward, 8.73 for a training step; at LightOn's
11,000 tok/s/GPU that is 96 TFLOP/s, MFU 0.31 of an A100's dense bf16 312 (the paper's figure).
"""

from __future__ import annotations

from models.config import MambaConfig
from models.mamba_lm import MLP_MULTIPLE_OF


def mixer_flops_per_token(cfg: MambaConfig, layer_idx: int, seq_len: int) -> int:
    D, E, N, K = cfg.d_model, cfg.d_inner, cfg.ssm.d_state, cfg.ssm.d_conv
    kind = cfg.mixer_kind(layer_idx)
    if kind == "mamba1":
        R = cfg.dt_rank
        return 4 * D * E + 2 * E * K + 2 * E * (R + 2 * N) + 2 * R * E + 9 * E * N + 2 * E * D
    if kind == "mamba2":
        G, H = cfg.ssm.ngroups, cfg.nheads
        return 2 * D * (2 * E + 2 * G * N + H) + 7 * E * N + 2 * E * D
    h, h_kv, d_h = cfg.attn.num_heads, cfg.attn_num_heads_kv, cfg.attn_head_dim
    return 2 * D * (h + 2 * h_kv) * d_h + 4 * h * d_h * seq_len + 2 * h * d_h * D


def forward_flops_per_token(cfg: MambaConfig, seq_len: int) -> int:
    total = sum(mixer_flops_per_token(cfg, i, seq_len) for i in range(cfg.n_layer))
    if cfg.d_intermediate:
        d_ff = (cfg.d_intermediate + MLP_MULTIPLE_OF - 1) // MLP_MULTIPLE_OF * MLP_MULTIPLE_OF
        total += cfg.n_layer * 6 * cfg.d_model * d_ff
    return total + 2 * cfg.d_model * cfg.padded_vocab_size


def training_flops_per_token(cfg: MambaConfig, seq_len: int) -> int:
    return 3 * forward_flops_per_token(cfg, seq_len)
