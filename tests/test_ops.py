"""The PyTorch scans against step-by-step float64 recurrences written out independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ops


def mamba1_recurrence_f64(u, delta, A, B, C, D, z, delta_bias):
    """h_t = exp(dt A) h + dt B_t u_t, y = C_t h_t + D u, y *= silu(z): one step at a time, float64."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    b, d, length = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        dt = F.softplus(delta[:, :, t] + delta_bias)  # (b, d)
        h = torch.exp(dt[..., None] * A) * h + (dt * u[:, :, t])[..., None] * B[:, None, :, t]
        y = (h * C[:, None, :, t]).sum(-1) + D * u[:, :, t]
        ys.append(y * F.silu(z[:, :, t]))
    return torch.stack(ys, dim=-1), h


def ssd_recurrence_f64(x, dt, A, B, C, D, initial_state=None, seq_idx=None):
    """Mamba-2 per-head recurrence, one step at a time, float64. dt already positive.

    With seq_idx (b, l) the state restarts from zero where the document index changes."""
    x, dt, A, B, C, D = (t.double() for t in (x, dt, A, B, C, D))
    b, length, h, p = x.shape
    g = B.shape[2]
    init = (
        torch.zeros(b, h, p, B.shape[3], dtype=torch.float64)
        if initial_state is None
        else initial_state.double()
    )
    states = list(init.unbind(1))  # one (b, p, n) state per head, rebuilt (not mutated) every step
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
            states = [s * keep for s in states]
        y_t = []
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])  # (b,)
            states[head] = decay[:, None, None] * states[head] + (
                dt[:, t, head, None, None] * x[:, t, head, :, None] * B[:, t, grp, None, :]
            )
            y_t.append((states[head] * C[:, t, grp, None, :]).sum(-1) + D[head] * x[:, t, head])
        ys.append(torch.stack(y_t, dim=1))
    return torch.stack(ys, dim=1), torch.stack(states, dim=1)


@pytest.mark.parametrize("length", [1, 13])
def test_selective_scan_matches_recurrence(length: int) -> None:
    b, d, n = 2, 5, 3
    u, delta, z = torch.randn(b, d, length), torch.randn(b, d, length), torch.randn(b, d, length)
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, n, length), torch.randn(b, n, length)
    D, bias = torch.randn(d), torch.randn(d)
    y, last = ops.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = mamba1_recurrence_f64(u, delta, A, B, C, D, z, bias)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("length", "chunk", "ngroups"), [(16, 4, 1), (13, 4, 2), (5, 8, 1), (21, 8, 4), (150, 256, 2)]
)
def test_ssd_chunked_matches_recurrence(length: int, chunk: int, ngroups: int) -> None:
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, length, h, p)
    dt = F.softplus(torch.randn(b, length, h))
    A = -torch.rand(h) - 0.2
    B, C = torch.randn(b, length, ngroups, n), torch.randn(b, length, ngroups, n)
    D = torch.randn(h)
    init = torch.randn(b, h, p, n)
    y, final = ops.ssd_chunked_scan(x, dt, A, B, C, chunk, D=D, initial_state=init, return_final_state=True)
    y_ref, final_ref = ssd_recurrence_f64(x, dt, A, B, C, D, initial_state=init)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)


def test_ssd_gradients_match_recurrence() -> None:
    b, length, h, p, n = 1, 10, 2, 2, 3
    tensors = [
        torch.randn(b, length, h, p),
        torch.randn(b, length, h),
        torch.randn(b, length, 1, n),
        torch.randn(b, length, 1, n),
    ]
    for t in tensors:
        t.requires_grad_(True)
    x, dt_raw, B, C = tensors
    A, D = -torch.rand(h) - 0.2, torch.randn(h)
    ops.ssd_chunked_scan(x, dt_raw, A, B, C, 4, D=D, dt_softplus=True).square().sum().backward()
    ours = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    ssd_recurrence_f64(x, F.softplus(dt_raw), A, B, C, D)[0].square().sum().backward()
    for a, ref in zip(ours, [t.grad for t in tensors]):
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)


def test_gated_rms_norm_per_group_f64() -> None:
    x, z, w = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(8)
    out = ops.rms_norm_gated(x, z, w, eps=1e-5, group_size=4)
    gated = x.double() * torch.sigmoid(z.double()) * z.double()
    expected = torch.empty_like(gated)
    for lo in (0, 4):
        part = gated[..., lo : lo + 4]
        expected[..., lo : lo + 4] = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.double(), expected * w.double(), rtol=1e-5, atol=1e-6)


def test_causal_conv_step_matches_full() -> None:
    x, w, bias = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6)
    full = ops.causal_conv1d(x, w, bias)
    state = torch.zeros(2, 6, 4)
    steps = torch.stack([ops.causal_conv1d_step(x[:, :, t], state, w, bias) for t in range(9)], dim=-1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("length", "chunk"), [(20, 4), (13, 8), (9, 16)])
def test_ssd_resets_state_at_document_boundaries(length: int, chunk: int) -> None:
    b, h, p, n, g = 2, 4, 3, 5, 2
    x = torch.randn(b, length, h, p)
    dt = F.softplus(torch.randn(b, length, h))
    A = -torch.rand(h) - 0.2
    B, C = torch.randn(b, length, g, n), torch.randn(b, length, g, n)
    D = torch.randn(h)
    # Row 0: boundaries inside and at the edges of chunks; row 1: a single document.
    starts = torch.zeros(b, length, dtype=torch.long)
    starts[0, [3, 4, 8, length - 1]] = 1
    seq_idx = starts.cumsum(1)
    y, final = ops.ssd_chunked_scan(x, dt, A, B, C, chunk, D=D, seq_idx=seq_idx, return_final_state=True)
    y_ref, final_ref = ssd_recurrence_f64(x, dt, A, B, C, D, seq_idx=seq_idx)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), final_ref, rtol=1e-5, atol=1e-5)
    # Without boundaries the option changes nothing.
    torch.testing.assert_close(y[1], ops.ssd_chunked_scan(x, dt, A, B, C, chunk, D=D)[1])


def test_causal_conv_stays_inside_documents() -> None:
    x, w, bias = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]] * 2)
    y = ops.causal_conv1d(x, w, bias, seq_idx=seq_idx)
    # Each document alone, convolved from a zero history, is the reference.
    for lo, hi in [(0, 3), (3, 5), (5, 9)]:
        torch.testing.assert_close(
            y[..., lo:hi], ops.causal_conv1d(x[..., lo:hi], w, bias), rtol=1e-5, atol=1e-6
        )
