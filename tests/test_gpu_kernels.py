"""GPU only (``make test-gpu``): the mamba_ssm kernel path against the PyTorch path, and mamba_ssm itself.

Skipped where no CUDA device is visible (tests/conftest.py). Needs ``make install-gpu``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from handover.mamba_ssm import export_mamba_ssm
from models.config import MambaConfig, SSMConfig, preset
from models.mamba_lm import MambaLMHeadModel

pytestmark = pytest.mark.gpu

CONFIGS = {
    "mamba1": MambaConfig(d_model=128, n_layer=2, vocab_size=1000, ssm=SSMConfig(d_state=16)),
    "mamba2": MambaConfig(
        d_model=128,
        n_layer=2,
        vocab_size=1000,
        ssm=SSMConfig(layer="mamba2", d_state=64, headdim=32, chunk_size=64),
    ),
    "mamba2-groups": MambaConfig(
        d_model=128,
        n_layer=2,
        vocab_size=1000,
        ssm=SSMConfig(layer="mamba2", d_state=32, headdim=32, ngroups=2, chunk_size=32),
    ),
}
# (forward tolerance, gradient tolerance); bf16 compares two bf16 computations with different
# reduction orders, so its bound is loose by design.
TOLERANCES = {torch.float32: (2e-3, 5e-3), torch.bfloat16: (5e-2, 1e-1)}


def pair(cfg: MambaConfig) -> tuple[MambaLMHeadModel, MambaLMHeadModel]:
    torch_path = MambaLMHeadModel(MambaConfig(**{**cfg.__dict__, "impl": "torch"})).cuda()
    kernel_path = copy.deepcopy(torch_path)
    for module in kernel_path.modules():
        if hasattr(module, "impl"):
            module.impl = "kernels"
    return torch_path, kernel_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernels_match_pytorch_path(name: str, dtype: torch.dtype) -> None:
    ref, fast = pair(CONFIGS[name])
    ids = torch.randint(0, 1000, (2, 300), device="cuda")  # 300: not a multiple of the chunk size
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out_ref, out_fast = ref(ids), fast(ids)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(out_fast.float(), out_ref.float(), rtol=fwd_tol, atol=fwd_tol)
    out_ref.float().square().mean().backward()
    out_fast.float().square().mean().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        scale = a.grad.abs().max().clamp_min(1e-6)
        assert ((b.grad - a.grad).abs().max() / scale).item() < grad_tol, n


@pytest.mark.parametrize("name", ["debug", "debug-mamba2", "debug-hybrid"])
def test_mamba_ssm_loads_our_export_with_equal_logits(name: str, tmp_path: Path) -> None:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as MambaSSMLM

    ours = MambaLMHeadModel(preset(name, impl="kernels")).cuda()
    export_mamba_ssm(ours, tmp_path / "ms")
    theirs = MambaSSMLM.from_pretrained(str(tmp_path / "ms"), device="cuda", dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 64), device="cuda")
    torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=2e-3, atol=2e-3)


def test_kernels_restart_state_at_document_boundaries() -> None:
    ref, fast = pair(CONFIGS["mamba2"])
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    starts = torch.zeros(2, 300, dtype=torch.long, device="cuda")
    starts[0, [17, 64, 65, 200]] = 1
    seq_idx = starts.cumsum(1)
    torch.testing.assert_close(fast(ids, seq_idx=seq_idx), ref(ids, seq_idx=seq_idx), rtol=2e-3, atol=2e-3)
