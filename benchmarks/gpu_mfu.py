"""Training throughput and MFU on one GPU: presets 0.5b and 1.6b at sequence 4096.

For each preset, micro-batch size and activation-checkpointing mode, one process-local
training step (bf16 autocast with fp32 master weights, as Composer's ``amp_bf16``; forward,
mean cross-entropy, backward, AdamW step) is timed after warm-up steps, with CUDA
synchronisation around each step. Printed per row: tokens/s on this GPU, model TFLOP/s
(``models/flops.py``: training = 3 x forward, recomputation not counted) and MFU against the
dense bf16 peak of the detected GPU (H100 / H200 989 TFLOP/s, A100 312; ``--peak-tflops`` for
others). The paper's Mambaoutai run reached MFU 0.31 on A100s with FSDP (../README.md); the
goal on one H100/H200 is at least 0.45. A configuration that runs out of memory prints ``OOM``.

Checkpointing modes: ``none``; ``block`` (every block recomputed in the backward, the
paper's block-wise recomputation); ``half`` (every other block).

Without a GPU, or with ``--dry-run``, the same code runs on the CPU in fp32 on the ``debug``
preset at a short sequence (the test suite runs this), so the script is known to work before
a GPU is at hand.

    python benchmarks/gpu_mfu.py --out results/            # on a GPU machine
    python benchmarks/gpu_mfu.py --dry-run                  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cli
from common.io import atomic_write_text
from models.config import MambaConfig, preset
from models.flops import training_flops_per_token
from models.mamba_lm import Block, MambaLMHeadModel

# Dense bf16 tensor-core peaks (vendors' datasheets, without sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
CKPT_MODES = ("none", "block", "half")


@dataclass
class Row:
    preset: str
    seq_len: int
    micro_batch: int
    checkpointing: str
    status: str  # ok | OOM | error: ...
    tok_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    step_s: float | None = None
    peak_mem_gb: float | None = None


def detect_peak(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "CPU (dry run)", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    return name, next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def set_checkpointing(model: MambaLMHeadModel, mode: str) -> None:
    """Wrap chosen blocks' forward in non-reentrant activation checkpointing."""
    for i, block in enumerate(model.backbone.layers):
        assert isinstance(block, Block)
        if mode == "block" or (mode == "half" and i % 2 == 0):
            forward = block.forward

            def wrapped(*args, _forward=forward, **kwargs):
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            block.forward = wrapped


def measure(
    cfg: MambaConfig,
    name: str,
    seq_len: int,
    micro_batch: int,
    mode: str,
    args: argparse.Namespace,
    peak: float | None,
) -> Row:
    """One configuration's row; out of memory and kernel failures are reported in the row."""
    device = torch.device(args.device)
    row = Row(name, seq_len, micro_batch, mode, status="ok")
    try:
        times, peak_mem = timed_steps(cfg, seq_len, micro_batch, mode, args, device)
    except torch.OutOfMemoryError:
        row.status = "OOM"
        return row
    except RuntimeError as exc:  # a kernel failure is reported in its row; the sweep goes on
        row.status = f"error: {str(exc).splitlines()[0][:120]}"
        return row
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.step_s = statistics.median(times)
    row.tok_s = micro_batch * seq_len / row.step_s
    row.tflops = training_flops_per_token(cfg, seq_len) * row.tok_s / 1e12
    row.mfu = row.tflops / peak if peak else None
    row.peak_mem_gb = peak_mem
    return row


def timed_steps(
    cfg: MambaConfig,
    seq_len: int,
    micro_batch: int,
    mode: str,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[list[float], float | None]:
    """Seconds of each timed training step, and the peak GPU memory (GB; None on CPU)."""
    torch.manual_seed(0)
    with device:  # built and initialised on the GPU: a 1.6B model's CPU init would take longer than its steps
        model = MambaLMHeadModel(cfg)
    set_checkpointing(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return times, peak_mem


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_row(r: Row) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    return (
        f"{r.preset:<7} {r.seq_len:>6} {r.micro_batch:>5} {r.checkpointing:<6} {r.status if r.status != 'ok' else '':<6}"
        f"{f(r.tok_s, ',.0f'):>12} {f(r.tflops, '.1f'):>9} {f(r.mfu, '.3f'):>6} {f(r.step_s, '.3f'):>8} "
        f"{f(r.peak_mem_gb, '.1f'):>8}"
    )


HEADER = f"{'preset':<7} {'seq':>6} {'mb':>5} {'ckpt':<6} {'':<6}{'tok/s/GPU':>12} {'TFLOP/s':>9} {'MFU':>6} {'s/step':>8} {'mem GB':>8}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python benchmarks/gpu_mfu.py", __doc__)
    p.add_argument("--presets", nargs="+", default=["0.5b", "1.6b"], help="model presets (GPU run)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length (GPU run)")
    p.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2, 4, 8], help="micro-batch sizes")
    p.add_argument("--checkpointing", nargs="+", choices=CKPT_MODES, default=list(CKPT_MODES), help="modes")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak (default: from the GPU name)"
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, debug preset, short sequence")
    p.add_argument("--out", type=Path, default=None, help="folder for mfu.json and mfu.txt")
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        args.dry_run, args.device = True, "cpu"
        args.presets, args.seq_len = ["debug"], 64
        args.micro_batches = [m for m in args.micro_batches if m <= 2] or [1]
        args.warmup, args.steps = 1, 1
    else:
        args.device = "cuda"
    if min(args.micro_batches) < 1 or args.seq_len < 1 or args.steps < 1 or args.warmup < 0:
        raise cli.UserError("--micro-batches, --seq-len and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu, peak = detect_peak(device, args.peak_tflops)
    lines = [
        f"# {'DRY RUN on CPU (fp32, debug preset): not a GPU measurement' if args.dry_run else 'bf16 autocast'}; "
        f"device {gpu}; dense bf16 peak {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s",
        f"# torch {torch.__version__}; {args.warmup} warm-up + {args.steps} timed steps (median); "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        HEADER,
    ]
    for line in lines:
        print(line, flush=True)
    rows = []
    for name in args.presets:
        cfg = preset(name, impl="torch" if args.dry_run else "kernels")
        for mode in args.checkpointing:
            for mb in sorted(args.micro_batches):
                row = measure(cfg, name, args.seq_len, mb, mode, args, peak)
                rows.append(row)
                lines.append(format_row(row))
                print(lines[-1], flush=True)
                if row.status == "OOM":  # a larger micro-batch will not fit either
                    break
    best = max((r for r in rows if r.mfu is not None), key=lambda r: r.mfu, default=None)
    if best is not None:
        lines.append(
            f"# best MFU {best.mfu:.3f}: {best.preset} mb {best.micro_batch} ckpt {best.checkpointing}"
        )
        print(lines[-1], flush=True)
    if args.out is not None:
        atomic_write_text(args.out / "mfu.txt", "\n".join(lines) + "\n")
        atomic_write_text(
            args.out / "mfu.json",
            json.dumps({"device": gpu, "peak_tflops": peak, "rows": [asdict(r) for r in rows]}, indent=2)
            + "\n",
        )
    return rows


if __name__ == "__main__":
    cli.run(main)
