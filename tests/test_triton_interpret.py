"""Mamba-2's kernel path (``model.impl=kernels``) on the CPU: mamba_ssm's Triton SSD kernels, run by
Triton's interpreter, against the PyTorch path.

``make test-triton`` installs mamba-ssm 2.3.1 without its CUDA extensions into ``.venv-triton`` and
runs this file with ``TRITON_INTERPRET=1``; elsewhere the interpreter tests skip and say why. The
model code is this repository's, unchanged; the SSD scan is mamba_ssm's ``mamba_chunk_scan_combined``
(forward and backward Triton kernels). What stands in for the GPU, none of it the SSD kernels:

- ``selective_scan_cuda``, ``causal_conv1d_cuda``: empty modules. mamba_ssm's and causal_conv1d's
  Python modules import these compiled extensions at load time; Mamba-2 never calls the first, and
  the second is reached only through ``causal_conv1d_fn``, replaced next.
- ``causal_conv1d_fn``: the depthwise convolution exists only as CUDA C++ (no Triton version), so it
  cannot run on a CPU. ``ConvContract`` binds each call to the real function's signature, checks the
  arguments the kernel path passes (``seq_idx`` int32 (b, l), SiLU) and computes with the PyTorch
  path's ``ops.causal_conv1d``. The convolution is thus the same on both sides: these tests cover
  the SSD kernels and the kernel path's glue around them.
- Triton's active driver: Triton 3.3's ``triton.autotune`` asks the GPU driver for a benchmarker when
  a kernel is defined, interpreter or not (``RuntimeError: 0 active drivers ([]). There should only be
  one.``). Here a benchmarker that times nothing, so each autotuned kernel keeps its first config
  (configs differ in block sizes only and compute the same function).
- ``torch.cuda.device(None)``: mamba_ssm enters ``torch.cuda.device(x.device.index)``, ``None`` for a
  CPU tensor; torch 2.7.0 documents that as a no-op but, without a CUDA driver, raises
  ``RuntimeError: invalid argument to exchangeDevice``. Here it is the documented no-op.
- ``torch.cuda.get_device_properties``: three backward wrappers split the heads over programs by the
  GPU's multiprocessor count; here 132 (an H100 SXM), which puts one head per program, so the split
  partial sums are exercised.

The interpreter computes ``tl.dot`` in full float32 (numpy), where a GPU uses TF32 by default: this
checks the kernels' math and our calls, not the GPU's rounding (``make test-gpu`` does that).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import ops
from models.config import MambaConfig, SSMConfig
from models.kernels import kernel_status, load_kernels, triton_interpreter, use_kernels
from models.mamba_lm import MambaLMHeadModel

# Two layers, 4 heads in 2 groups, d_state 16, chunk 16; sequences of 40 (not a multiple of the chunk).
CONFIG = MambaConfig(
    d_model=32,
    n_layer=2,
    vocab_size=61,
    ssm=SSMConfig(layer="mamba2", d_state=16, headdim=16, ngroups=2, chunk_size=16),
)
BATCH, SEQLEN = 2, 40
# Row 0 starts documents inside a chunk, on a chunk boundary and right after it; row 1 is one document.
DOC_STARTS = [5, 16, 17, 30]
# Both paths compute in float32 and differ only in summation order (blocks of the chunked products,
# cumulative sums of log-decays): measured at most 4e-6 of each tensor's largest entry (README). 1e-4
# of it leaves 25x headroom and is still far below the O(1) relative error of a wrong document reset,
# a dropped D or dt_bias.
REL_TOL = 1e-4
H100_SXM = SimpleNamespace(multi_processor_count=132)


def interpreter_skip_reason() -> str | None:
    if not triton_interpreter():
        return "needs TRITON_INTERPRET=1 and mamba-ssm installed without CUDA: run `make test-triton`"
    missing = [m for m in ("triton", "mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: `make test-triton` installs them into .venv-triton"
    return None


class NoTimingBenchmarker:
    """Triton's driver as the autotuner sees it: every config 'takes' 0 ms, so the first one is kept."""

    def get_benchmarker(self):
        return lambda kernel_call, quantiles: [0.0, 0.0, 0.0]


class ConvContract:
    """Stands in for ``causal_conv1d_fn`` (CUDA only): checks each call, computes with ``ops.causal_conv1d``."""

    def __init__(self, real_fn: object) -> None:
        self.signature = inspect.signature(real_fn)
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        call = self.signature.bind(*args, **kwargs)  # TypeError if the call does not fit the real function
        call.apply_defaults()
        a = call.arguments
        x, weight, bias, seq_idx = a["x"], a["weight"], a["bias"], a["seq_idx"]
        b, d, seqlen = x.shape
        assert weight.shape[0] == d and weight.dim() == 2, weight.shape
        assert a["activation"] in ("silu", "swish"), a["activation"]
        assert a["initial_states"] is None and not a["return_final_states"]
        if seq_idx is not None:
            assert seq_idx.dtype == torch.int32 and seq_idx.shape == (b, seqlen), (
                seq_idx.dtype,
                seq_idx.shape,
            )
        self.calls += 1
        return ops.causal_conv1d(x, weight, bias, activation=True, seq_idx=seq_idx)


@pytest.fixture(scope="module")
def interpreted_kernels() -> Iterator[SimpleNamespace]:
    """load_kernels() with mamba_ssm's Triton kernels under the interpreter (stand-ins: module docstring)."""
    reason = interpreter_skip_reason()
    if reason:
        pytest.skip(reason)
    from triton.runtime.driver import driver

    real_device, real_properties = torch.cuda.device, torch.cuda.get_device_properties
    kernel_status.cache_clear()
    load_kernels.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
            if importlib.util.find_spec(name) is None:
                mp.setitem(sys.modules, name, types.ModuleType(name))
        mp.setattr(
            torch.cuda,
            "device",
            lambda index: contextlib.nullcontext() if index is None else real_device(index),
        )
        mp.setattr(
            torch.cuda,
            "get_device_properties",
            lambda device: H100_SXM if torch.device(device).type == "cpu" else real_properties(device),
        )
        driver.set_active(NoTimingBenchmarker())
        try:
            available, reason = kernel_status()
            assert available, reason
            kernels = load_kernels()
            mp.setattr(kernels, "causal_conv1d_fn", ConvContract(kernels.causal_conv1d_fn))
            yield kernels
        finally:
            driver.reset_active()
            kernel_status.cache_clear()
            load_kernels.cache_clear()


def model_pair() -> tuple[MambaLMHeadModel, MambaLMHeadModel]:
    """The same weights on the PyTorch path and on the kernel path; D, norms and biases moved off their init."""
    torch_path = MambaLMHeadModel(replace(CONFIG, impl="torch"))
    with torch.no_grad():
        for name, p in torch_path.named_parameters():
            if "norm" in name or name.endswith((".D", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    kernel_path = MambaLMHeadModel(replace(CONFIG, impl="kernels"))
    kernel_path.load_state_dict(torch_path.state_dict())
    return torch_path, kernel_path


def max_diff_table(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[str, float, float]]:
    """(name, max |kernel - torch|, max |torch|) for each pair, printed for the README's table."""
    rows = [(n, (k - t).abs().max().item(), t.abs().max().item()) for n, (k, t) in pairs.items()]
    print(f"\n{'tensor':<48} {'max abs diff':>12} {'max abs ref':>11} {'ratio':>9}")
    for name, diff, ref in rows:
        print(f"{name:<48} {diff:>12.2e} {ref:>11.2e} {diff / max(ref, 1e-30):>9.1e}")
    return rows


@pytest.mark.triton_interpret
@pytest.mark.slow
def test_mamba2_kernel_path_matches_pytorch_path_with_document_resets(
    interpreted_kernels: SimpleNamespace,
) -> None:
    torch_path, kernel_path = model_pair()
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQLEN))
    targets = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQLEN))
    starts = torch.zeros(BATCH, SEQLEN, dtype=torch.long)
    starts[0, DOC_STARTS] = 1
    seq_idx = starts.cumsum(1)

    outputs = {}
    calls_before = interpreted_kernels.causal_conv1d_fn.calls
    for name, model in (("torch", torch_path), ("kernels", kernel_path)):
        logits = model(ids, seq_idx=seq_idx)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        outputs[name] = logits.detach()
    # The kernel branch ran in every layer (the torch path never calls causal_conv1d_fn).
    assert interpreted_kernels.causal_conv1d_fn.calls - calls_before == CONFIG.n_layer

    pairs = {"logits": (outputs["kernels"], outputs["torch"])}
    for (name, p_torch), (_, p_kernel) in zip(torch_path.named_parameters(), kernel_path.named_parameters()):
        pairs[f"grad {name}"] = (p_kernel.grad, p_torch.grad)
    for name, diff, ref in max_diff_table(pairs):
        assert diff <= REL_TOL * max(ref, 1e-6), f"{name}: max abs diff {diff:.3e}, largest entry {ref:.3e}"


@pytest.mark.triton_interpret
@pytest.mark.slow
def test_mamba2_kernel_prefill_state_matches_pytorch_path(interpreted_kernels: SimpleNamespace) -> None:
    """Prefill for generation: the kernels' final SSM state (``return_final_states``) and the conv state."""
    torch_path, kernel_path = model_pair()
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQLEN))
    calls_before = interpreted_kernels.causal_conv1d_fn.calls
    with torch.no_grad():
        cache_torch = torch_path.allocate_inference_cache(BATCH, SEQLEN + 1)
        cache_kernels = kernel_path.allocate_inference_cache(BATCH, SEQLEN + 1)
        pairs = {"logits": (kernel_path(ids, cache_kernels), torch_path(ids, cache_torch))}
    assert interpreted_kernels.causal_conv1d_fn.calls - calls_before == CONFIG.n_layer
    for layer in range(CONFIG.n_layer):
        for i, kind in enumerate(("conv", "ssm")):
            pairs[f"layer {layer} {kind} state"] = (
                cache_kernels.states[layer][i],
                cache_torch.states[layer][i],
            )
    for name, diff, ref in max_diff_table(pairs):
        assert diff <= REL_TOL * max(ref, 1e-6), f"{name}: max abs diff {diff:.3e}, largest entry {ref:.3e}"


def test_kernel_path_accepts_cpu_tensors_only_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 4, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"model\.impl=kernels needs CUDA tensors, got cpu"):
        use_kernels("kernels", x)
    assert not use_kernels("auto", x) and not use_kernels("torch", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_kernels("auto", x)  # auto never picks the interpreter
    if interpreter_skip_reason() is None:
        return  # the kernels import here (the tests above); the refusal below is for a machine without them
    kernel_status.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"model\.impl=kernels but the kernels are unavailable"):
            use_kernels("kernels", x)
    finally:
        kernel_status.cache_clear()
