"""Pure-PyTorch sequence operators of Mamba-1 and Mamba-2: the CPU path and the reference.

Each operator has the semantics of its mamba_ssm / causal_conv1d CUDA counterpart (same
arguments, same math) so that ``models/kernels.py`` can swap one for the other:

- ``causal_conv1d``     ~ causal_conv1d.causal_conv1d_fn
- ``selective_scan``    ~ mamba_ssm.ops.selective_scan_interface.selective_scan_fn (Mamba-1); on
                        the CPU a fused C kernel (models/cpu_scan.py), ``selective_scan_ref``
                        its PyTorch loop
- ``ssd_chunked_scan``  ~ mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined (Mamba-2)

Both scans are linear in sequence length in forward and backward. The selective scan walks
the sequence with ``unbind`` (indexing ``x[:, :, t]`` step by step makes autograd allocate a
full-size gradient per step, a quadratic backward); the SSD scan is chunked
(Dao & Gu 2024, section 6: quadratic "attention-like" form inside a chunk, a linear
recurrence over chunk states between chunks) with the inter-chunk recurrence also sequential.
All state arithmetic is float32, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models import cpu_scan


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: bool = True, seq_idx: Tensor | None = None
) -> Tensor:
    """Depthwise causal convolution. x: (b, d, l), weight: (d, k) -> (b, d, l).

    With ``seq_idx`` (b, l), the document index of each position, a position sees only inputs
    of its own document (causal_conv1d's ``seq_idx``).
    """
    d, k = weight.shape
    if seq_idx is None:
        y = F.conv1d(x, weight.unsqueeze(1), bias, padding=k - 1, groups=d)[..., : x.shape[-1]]
    else:
        windows = F.pad(x, (k - 1, 0)).unfold(-1, k, 1)  # (b, d, l, k): inputs t-k+1 .. t
        idx = F.pad(seq_idx, (k - 1, 0), value=-1).unfold(-1, k, 1)  # (b, l, k)
        same_doc = (idx == seq_idx.unsqueeze(-1)).to(x.dtype)
        y = torch.einsum("bdlk,blk,dk->bdl", windows, same_doc, weight)
        if bias is not None:
            y = y + bias[:, None]
    return F.silu(y) if activation else y


def causal_conv1d_step(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: bool = True
) -> Tensor:
    """One token of ``causal_conv1d``. x: (b, d); conv_state (b, d, k) is shifted in place."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation else y


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan (Gu & Dao 2023, algorithm 2); arguments as ``selective_scan_ref``.

    CPU tensors of float32 or lower precision run the fused C kernel of ``models/cpu_scan.py``
    (no per-step autograd graph; states recomputed per chunk in the backward) when it is
    built; float64 and any other case run the PyTorch loop ``selective_scan_ref``.
    """
    args = (u, delta, A, B, C, D, z, delta_bias)
    fused = (
        all(t.device.type == "cpu" and t.dtype != torch.float64 for t in args if t is not None)
        and B.dim() == 3
        and cpu_scan.available()
    )
    scan = cpu_scan.selective_scan_fused if fused else selective_scan_ref
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan (Gu & Dao 2023, algorithm 2) as a PyTorch loop: the reference.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,).
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t h_t + D u_t;  y *= silu(z).
    Returns y (b, d, l) in u's dtype, and the last state (b, d, n) in float32 if asked.
    """
    dtype_in = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # One small step at a time over time-major, contiguous slices: materialising the
    # (b, l, d, n) discretisation up front costs far more memory traffic than it saves.
    A = A.float()
    ys = []
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    steps = zip(*(t.permute(2, 0, 1).contiguous().unbind(0) for t in (delta, delta * u, B, C)))
    for delta_t, du_t, B_t, C_t in steps:  # (b, d), (b, d), (b, n), (b, n)
        dA_t = torch.exp(delta_t.unsqueeze(-1) * A)  # (b, d, n)
        h = torch.addcmul(du_t.unsqueeze(-1) * B_t.unsqueeze(1), dA_t, h)
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One token of the Mamba-1 scan. state: (b, d, n) updated in place; x, dt, z: (b, d); B, C: (b, n)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[..., None] * A.float())
    state.copy_(state * dA + (dt * x.float())[..., None] * B.float()[:, None, :])
    y = (state * C.float()[:, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


TORCH_SSD_CHUNK = 64  # the longest chunk ssd_chunked_scan computes with (see there)


def ssd_chunked_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2 state-space dual scan, chunked.

    x: (b, l, h, p); dt: (b, l, h), made softplus(dt + dt_bias) as asked; A: (h,) negative;
    B, C: (b, l, g, n) with g groups shared by h/g consecutive heads; D: (h,);
    initial_state: (b, h, p, n); seq_idx: (b, l) document index of each position (the state is
    reset where it changes, mamba_ssm's ``seq_idx``). Recurrence per head:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t.
    ``chunk_size`` is the kernels' chunk; this path computes with at most ``TORCH_SSD_CHUNK``.
    Returns y (b, l, h, p) in x's dtype, and the final state (b, h, p, n) in float32 if asked.
    """
    b, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    # Chunking is exact, so the chunk length is free here: the intra-chunk work grows with it
    # (chunk x chunk x heads tensors) and the inter-chunk recurrence shrinks. On the CPU, at the
    # 130m width (24 heads, headdim 64, d_state 128), fwd + bwd took 66 ms at chunk 64 against
    # 124 ms at 256 (seq 512), and 0.39 s against 0.81 s (seq 2048), one thread.
    chunk_size = min(chunk_size, TORCH_SSD_CHUNK)
    heads_per_group = nheads // ngroups
    dtype_in = x.dtype
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    pad = (-seqlen) % chunk_size
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is exact.
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        if seq_idx is not None:  # padding continues the last document
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    nchunks = x.shape[1] // chunk_size

    def chunk(t: Tensor) -> Tensor:  # (b, l, ...) -> (b, c, T, ...)
        return t.reshape(b, nchunks, chunk_size, *t.shape[2:])

    xdt = chunk(x * dt[..., None])  # (b, c, T, h, p)
    a = chunk(dt * A.float())  # (b, c, T, h): log-decay per step, <= 0
    a_cum = torch.cumsum(a, dim=2)  # (b, c, T, h)
    Bc, Cc = chunk(B), chunk(C)  # (b, c, T, g, n)

    # 1. Within a chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_cum_i - a_cum_j) dt_j x_j.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    seg = a_cum[:, :, :, None, :] - a_cum[:, :, None, :, :]  # (b, c, i, j, h)
    if seq_idx is None:
        visible = causal[:, :, None]
    else:  # a position sees only earlier positions of its own document
        doc = chunk(seq_idx)  # (b, c, T)
        visible = (causal & (doc[:, :, :, None] == doc[:, :, None, :])).unsqueeze(-1)
    decay = torch.exp(torch.where(visible, seg, float("-inf")))
    cb = torch.einsum("bcign,bcjgn->bcijg", Cc, Bc).repeat_interleave(heads_per_group, dim=-1)
    y = torch.einsum("bcijh,bcjhp->bcihp", cb * decay, xdt)

    # 2. Each chunk's contribution to the state at its end: sum_j exp(a_cum_T - a_cum_j) dt_j x_j B_j^T.
    decay_to_end = torch.exp(a_cum[:, :, -1:, :] - a_cum)  # (b, c, T, h)
    if seq_idx is not None:  # only the chunk's last document reaches its end state
        decay_to_end = decay_to_end * (doc == doc[:, :, -1:]).unsqueeze(-1)
    Bh = Bc.repeat_interleave(heads_per_group, dim=3)  # (b, c, T, h, n)
    chunk_states = torch.einsum("bcjhn,bcjh,bcjhp->bchpn", Bh, decay_to_end, xdt)

    # 3. Between chunks: a linear recurrence over chunk boundaries (sequential, so linear in l).
    state = x.new_zeros(b, nheads, headdim, dstate) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cum[:, :, -1, :])  # (b, c, h)
    if seq_idx is not None:
        # Document index just before each chunk (-1 before the first: any initial state belongs
        # to the first position's document).
        before = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)  # (b, c)
        carried = doc == before.unsqueeze(-1)  # (b, c, T): positions that still see the entering state
        chunk_decay = chunk_decay * carried[:, :, -1:].to(chunk_decay.dtype)
    states_in = []
    for s_c, g_c in zip(chunk_states.unbind(1), chunk_decay.unbind(1)):
        states_in.append(state)
        state = g_c[:, :, None, None] * state + s_c
    prev = torch.stack(states_in, dim=1)  # (b, c, h, p, n): state entering each chunk

    # 4. The entering state seen from inside the chunk: y_i += exp(a_cum_i) C_i . state.
    Ch = Cc.repeat_interleave(heads_per_group, dim=3)  # (b, c, T, h, n)
    entering = torch.exp(a_cum)
    if seq_idx is not None:
        entering = entering * carried.unsqueeze(-1).to(entering.dtype)
    y = y + torch.einsum("bcihn,bchpn,bcih->bcihp", Ch, prev, entering)

    y = y.reshape(b, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    if D is not None:
        y = y + x[:, :seqlen] * D.float()[:, None]
    y = y.to(dtype_in)
    return (y, state) if return_final_state else y


def ssd_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """One token of the Mamba-2 scan. state: (b, h, p, n) in place; x: (b, h, p); dt: (b, h); B, C: (b, g, n)."""
    heads_per_group = x.shape[1] // B.shape[1]
    Bh = B.float().repeat_interleave(heads_per_group, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(heads_per_group, dim=1)
    dt = dt.float()
    dA = torch.exp(dt * A.float())  # (b, h)
    state.copy_(state * dA[:, :, None, None] + (dt[:, :, None] * x.float())[..., None] * Bh[:, :, None, :])
    y = (state * Ch[:, :, None, :]).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype)


def rms_norm_gated(x: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """mamba_ssm's RMSNormGated with norm_before_gate=False: RMSNorm(x * silu(z)) per group of channels."""
    dtype_in = x.dtype
    x = x.float()
    if z is not None:
        x = x * F.silu(z.float())
    xg = x.unflatten(-1, (-1, group_size))
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return (xg.flatten(-2) * weight.float()).to(dtype_in)
