"""The fused Mamba-1 selective scan for the CPU: builds ``cpu_scan.c`` and wraps it for autograd.

``ops.selective_scan`` runs this on CPU float32 (and lower precision) tensors when the library
is available, else its PyTorch loop, the reference; both compute the same function.

Why a plain C file compiled with the system C compiler and called through ``ctypes``, not a
``torch.utils.cpp_extension``: it compiles in about a second with nothing but ``gcc`` (no torch
headers, no ninja, no dependence on torch's C++ ABI), so it is cheap to build at ``make install``
and again on first use where it is missing; it sees only raw float32 buffers, which is all a
scan needs. The build is specific to this machine (``-march=native``: the dstate loops run on
the widest vectors the CPU has), so the library's file name carries a hash of the source, the
flags, the compiler and the CPU's feature flags; a checkout copied to another machine builds its
own. Where no compiler is found, or the build or load fails, ``status()`` says why, the reason
is logged once, and the PyTorch loop runs. ``MAMBA_RECIPES_CPU_SCAN=torch`` turns the fused
scan off (benchmarks use it to compare the two).

The forward keeps the state entering each chunk of ``CHUNK`` steps (``b*d*n*ceil(l/CHUNK)``
floats, 1/CHUNK of the states); the backward recomputes each chunk's states into a per-thread
buffer of ``CHUNK*n`` floats, as mamba_ssm's CUDA kernel does in shared memory. Work is split over
(batch, ``BLOCKS`` blocks of channels) and run on ``torch.get_num_threads()`` threads; the
gradients of B and C (sums over channels) are added per block and then over blocks in a fixed
order, so results do not depend on the thread count.

    python -m models.cpu_scan          # build (make install runs this) and print the status
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_scan.c")
ABI_VERSION = 1  # mamba_scan_abi() of cpu_scan.c
# -fopenmp-simd: honour `#pragma omp simd` (vectorise the dstate reductions) without linking an
# OpenMP runtime; -fno-math-errno: lets rintf vectorise; -ffp-contract=fast: fused multiply-adds
# (ISO C mode turns them off; 20% faster here). No -ffast-math: no reassociation beyond the
# reductions the pragmas name, no assumption that values are finite.
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-std=c99",
    "-fPIC",
    "-shared",
)
LDFLAGS = ("-lpthread",)
CHUNK = 64  # steps per recomputed chunk: 2 * 64 * n floats of scratch per thread (8 KB at n = 16)
BLOCKS = 16  # channel blocks per batch row: the unit of work and of the dB/dC partial sums
ENV_SWITCH = "MAMBA_RECIPES_CPU_SCAN"  # "torch" turns the fused scan off
_F32P = ctypes.POINTER(ctypes.c_float)


def compiler() -> str | None:
    """The C compiler to use: $CC when set (None if it is not found), else gcc, else cc on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("gcc") or shutil.which("cc")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), else the machine name: part of the library's key."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def library_path(cc: str) -> Path:
    """Where the library for this source, these flags, this compiler and this CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(CFLAGS + LDFLAGS), version, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    return _build_dir() / f"cpu_scan-{key}.so"


def _build_dir() -> Path:
    """models/_build beside the source, or the user cache where the package folder is read-only."""
    local = SOURCE.parent / "_build"
    try:
        local.mkdir(exist_ok=True)
        writable = os.access(local, os.W_OK)
    except OSError:  # a read-only install: the user's cache instead
        writable = False
    if writable:
        return local
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mamba-recipes"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def build(force: bool = False) -> Path:
    """Compile ``cpu_scan.c`` (about a second) unless already built; returns the library path.

    The library is written under a temporary name and renamed, so processes building at the
    same time (several ranks) never load a half-written file. Raises RuntimeError naming the
    cause when there is no compiler or the build fails.
    """
    cc = compiler()
    if cc is None:
        where = (
            f"CC={os.environ['CC']} is not an executable" if os.environ.get("CC") else "no gcc or cc on PATH"
        )
        raise RuntimeError(f"no C compiler: {where} (install gcc, e.g. apt-get install gcc, or set CC)")
    target = library_path(cc)
    if target.exists() and not force:
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, "-o", tmp, str(SOURCE), *LDFLAGS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}): {detail}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, reason): the loaded library or None, and a sentence saying which scan runs and why."""
    if os.environ.get(ENV_SWITCH, "").lower() == "torch":
        return None, f"{ENV_SWITCH}=torch: the PyTorch loop (models/ops.py) runs"
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as exc:
        return None, f"fused CPU scan unavailable ({exc}); the PyTorch loop (models/ops.py) runs"
    if lib.mamba_scan_abi() != ABI_VERSION:
        return None, f"{path} has ABI {lib.mamba_scan_abi()}, expected {ABI_VERSION}; rebuild it"
    i64, f32p, c_int = ctypes.c_int64, _F32P, ctypes.c_int
    lib.mamba_scan_fwd.argtypes = [i64] * 6 + [f32p] * 10 + [c_int]
    lib.mamba_scan_bwd.argtypes = [i64] * 6 + [f32p] * 16 + [c_int]
    lib.mamba_scan_fwd.restype = lib.mamba_scan_bwd.restype = c_int
    return lib, f"fused C kernel ({path.name}, {compiler()})"


def status() -> tuple[bool, str]:
    """(available, reason): whether the fused scan runs in this process, building it if needed."""
    lib, reason = _load()
    return lib is not None, reason


@functools.cache
def _log_fallback_once(reason: str) -> None:
    log.warning("%s", reason)


def available() -> bool:
    """Whether the fused scan runs; the first time it does not, the reason is logged."""
    ok, reason = status()
    if not ok and os.environ.get(ENV_SWITCH, "").lower() != "torch":
        _log_fallback_once(reason)
    return ok


# ----------------------------------------------------------------------------------------------
# autograd


def _ptr(t: Tensor | None) -> ctypes._Pointer | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    return ctypes.cast(t.data_ptr(), _F32P)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _step_size(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """dt = softplus(delta + delta_bias) as asked, float32, contiguous (b, d, l)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return (F.softplus(delta) if softplus else delta).contiguous()


class FusedSelectiveScan(torch.autograd.Function):
    """``ops.selective_scan``'s function with a fused forward and a chunk-recomputing backward."""

    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        return_last_state: bool,
    ) -> tuple[Tensor, Tensor | None]:
        lib, _ = _load()
        assert lib is not None
        b, d, length = u.shape
        n = A.shape[1]
        u32, delta32, A32, D32, z32, bias32 = (_f32(t) for t in (u, delta, A, D, z, delta_bias))
        Bt, Ct = (t.detach().float().transpose(1, 2).contiguous() for t in (B, C))  # (b, l, n)
        dt = _step_size(delta32, bias32, delta_softplus)
        nchunks = -(-length // CHUNK)
        out = u32.new_empty(b, d, length)
        states = u32.new_empty(b, d, nchunks, n)
        last = u32.new_empty(b, d, n) if return_last_state else None
        rc = lib.mamba_scan_fwd(
            b, d, length, n, CHUNK, min(BLOCKS, d),
            *(_ptr(t) for t in (u32, dt, A32, Bt, Ct, D32, z32, out, states, last)),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("fused CPU scan: could not allocate its per-thread scratch buffers")
        ctx.save_for_backward(u32, delta32, A32, Bt, Ct, D32, z32, bias32, states)
        ctx.delta_softplus = delta_softplus
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)]
        if last is not None:
            ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout: Tensor, _dlast: Tensor | None) -> tuple[Tensor | None, ...]:
        lib, _ = _load()
        assert lib is not None
        u32, delta32, A32, Bt, Ct, D32, z32, bias32, states = ctx.saved_tensors
        b, d, length = u32.shape
        n = A32.shape[1]
        blocks = min(BLOCKS, d)
        dt = _step_size(delta32, bias32, ctx.delta_softplus)
        dout = dout.to(torch.float32).contiguous()
        du, ddt = torch.empty_like(u32), torch.empty_like(u32)
        dz = torch.empty_like(u32) if z32 is not None else None
        dA_part, dD_part = u32.new_empty(b, d, n), u32.new_empty(b, d)
        dB_part, dC_part = u32.new_zeros(b, blocks, length, n), u32.new_zeros(b, blocks, length, n)
        rc = lib.mamba_scan_bwd(
            b, d, length, n, CHUNK, blocks,
            *(_ptr(t) for t in (u32, dt, A32, Bt, Ct, D32, z32, states, dout, du, ddt, dz)),
            *(_ptr(t) for t in (dA_part, dD_part, dB_part, dC_part)),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("fused CPU scan: could not allocate its per-thread scratch buffers")
        if ctx.delta_softplus:  # d softplus(x) / dx = sigmoid(x)
            x = delta32 if bias32 is None else delta32 + bias32[:, None]
            ddelta = ddt.mul_(torch.sigmoid(x))
        else:
            ddelta = ddt
        grads = (
            du,
            ddelta,
            dA_part.sum(0),
            dB_part.sum(1).transpose(1, 2),
            dC_part.sum(1).transpose(1, 2),
            dD_part.sum(0) if D32 is not None else None,
            dz,
            ddelta.sum((0, 2)) if bias32 is not None else None,
        )
        cast = tuple(g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*cast, None, None)


def selective_scan_fused(
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
    """``ops.selective_scan`` on the fused kernel (same arguments, shapes and result)."""
    y, last = FusedSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (y, last) if return_last_state else y


def main() -> None:
    """Build the library (``make install``) and print which scan runs."""
    try:
        path = build()
    except RuntimeError as exc:
        print(f"cpu_scan: not built: {exc}; the PyTorch loop will run", file=sys.stderr)
        return
    print(f"cpu_scan: {path}")


if __name__ == "__main__":
    main()
