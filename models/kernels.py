"""The optional CUDA kernels (mamba_ssm, causal_conv1d) behind one lazy import.

``import mamba_ssm`` fails on a machine without its compiled CUDA extension and a GPU driver
(its ``selective_scan_interface`` imports the compiled extension unconditionally), so nothing
here imports it at module load. ``use_kernels`` decides, per
forward, whether the kernels or the PyTorch operators of ``models/ops.py`` run; both take the
same parameters and compute the same function. On the CPU, Mamba-1's selective scan runs a
fused C kernel where it could be built (``cpu_scan_status`` says which scan runs and why).

Under Triton's interpreter (``TRITON_INTERPRET=1``) Triton kernels run on CPU tensors, so
``model.impl=kernels`` accepts them there: tests/test_triton_interpret.py runs Mamba-2's kernel
path on the CPU that way, mamba_ssm's SSD kernels in the interpreter (``make test-triton``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

import torch

INSTALL_HINT = (
    "install the GPU kernels with `make install-gpu` (mamba-ssm==2.3.1, causal-conv1d==1.6.2.post1; "
    "see README, 'GPU install'), or set model.impl=torch"
)


def triton_interpreter() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def kernel_status() -> tuple[bool, str]:
    """(available, reason): whether the mamba_ssm kernels can be used in this process."""
    if not torch.cuda.is_available() and not triton_interpreter():
        return False, "no CUDA device (the PyTorch path runs everywhere)"
    missing = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed; {INSTALL_HINT}"
    try:
        load_kernels()
    except Exception as exc:  # an ABI mismatch or a missing driver surfaces here, not at find_spec
        return False, f"importing the kernels failed ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    return True, "CUDA device and mamba_ssm/causal_conv1d kernels importable"


@functools.cache
def load_kernels() -> SimpleNamespace:
    """Import the kernels (CUDA machines; on the CPU, tests/test_triton_interpret.py under the interpreter)."""
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn,
        selective_scan_fn=selective_scan_fn,
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
    )


def use_kernels(impl: str, x: torch.Tensor) -> bool:
    """Whether a forward on tensor ``x`` uses the kernels under ``model.impl``."""
    if impl == "torch":
        return False
    if impl == "kernels":
        if not x.is_cuda and not triton_interpreter():
            raise ValueError(
                f"model.impl=kernels needs CUDA tensors, got {x.device}; use model.impl=auto or torch"
            )
        available, reason = kernel_status()
        if not available:
            raise RuntimeError(f"model.impl=kernels but the kernels are unavailable: {reason}")
        return True
    return x.is_cuda and kernel_status()[0]


def cpu_scan_status() -> tuple[bool, str]:
    """(fused, reason): whether Mamba-1's CPU selective scan runs the fused C kernel
    (models/cpu_scan.py, built on first call if missing) or the PyTorch loop, and why."""
    from models import cpu_scan

    return cpu_scan.status()
