"""Training throughput on the CPU: our PyTorch path against HF transformers' Mamba, at equal shapes.

One training step is forward + mean cross-entropy over the logits + backward (no optimizer
step), fp32, batch 1 (``--batch``). Each case runs in a fresh process: build the model, one warm-up step,
then up to ``--iters`` timed steps.

Implementations (the ``impl`` column):

- ``ours``        ``models.mamba_lm.MambaLMHeadModel`` with ``impl="torch"`` (models/ops.py;
                  Mamba-1 runs the fused C scan of models/cpu_scan.py when it is built).
- ``hf-slow``     HF ``MambaForCausalLM``, default ``use_mambapy=False``: its sequential
                  ``slow_forward`` (a per-step indexed scan whose backward grows
                  quadratically with sequence length).
- ``hf-mambapy``  HF ``MambaForCausalLM`` with ``use_mambapy=True`` (mamba.py's parallel scan;
                  needs the ``mambapy`` package, else the row says n/a).
- ``hf-torch``    HF ``Mamba2ForCausalLM``'s ``torch_forward`` (Mamba-2 shapes).

Every HF model is loaded with ``AutoModelForCausalLM.from_pretrained`` from our own
``handover.hf_mamba.export_hf`` of the same seeded model, so its shapes and weights equal ours.

Shapes (the ``shape`` column): ``debug`` and ``130m`` are our presets; ``tiny`` is the demo's
model (yamls/tiny: d_model 128, 4 layers, vocab 4096); ``debug-mamba2`` is
our preset; ``130m-mamba2`` is the 130m body with Mamba-2 mixers (d_state 128, headdim 64,
chunk 256, vocab 50277, tied head). ``--layers N`` truncates every shape to N layers; the
header then says TRUNCATED and ``layers`` shows ``N/full``.

Reading the table:

- ``tok/s``: sequence length / median step time of the timed steps. Higher is better.
- ``s/iter``: that median step time. ``best``: tok/s of the fastest timed step. Other jobs may
  share these 2 cores (the load average is in the header and footer); a ``best`` far above
  ``tok/s`` means the steps were disturbed, and ``best`` is then the better estimate of an
  idle machine.
- ``iters``: timed steps. ``1*`` means only the warm-up step fitted in the budget, so the
  figure is that single warm-up step (first-call overheads included: a pessimistic figure).
- ``vs ours``: this row's tok/s over ``ours`` at the same shape and length (< 1: slower).
- ``peak RSS Δ``: the process's peak resident memory during the steps above its resident
  memory after building the model (activations, gradients, temporaries), in MB.
- ``peak RSS``: the process's whole peak resident memory (model, gradients, activations,
  libraries), in GB.
- ``skipped (> B s)``: the warm-up step had not finished after the per-case budget ``B``
  (``--budget-s``), so the process was stopped; the note gives the implied upper bound on
  tok/s. ``skipped (RSS)``: the process passed ``--max-rss-gb`` and was stopped.

The budget bounds the measuring, not the setup: the warm-up plus the timed steps of a case stop
before the next step would pass ``--budget-s``. No figure here is asserted; it only prints.

Usage (from the repository root)::

    python benchmarks/bench_model.py --quick              # debug shapes, seq 512: about a minute
    python benchmarks/bench_model.py                      # the full table (tens of minutes on 2 cores)
    python benchmarks/bench_model.py --shapes 130m --layers 2 --seqlens 2048
    python benchmarks/bench_model.py --shapes tiny --seqlens 256 --batch 4 --threads 1   # the demo's step
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from handover.hf_mamba import export_hf
from models.config import MambaConfig, SSMConfig, preset
from models.mamba_lm import MambaLMHeadModel

SHAPES: dict[str, MambaConfig] = {
    "debug": preset("debug", impl="torch"),
    # The demo's model (yamls/tiny/wsd.yaml): d_model 128, 4 layers, d_state 16, 4096 tokens.
    "tiny": preset("debug", d_model=128, n_layer=4, vocab_size=4096, ssm=SSMConfig(d_state=16), impl="torch"),
    "130m": preset("130m", impl="torch"),
    "debug-mamba2": preset("debug-mamba2", impl="torch"),
    "130m-mamba2": preset(
        "130m", impl="torch", ssm=SSMConfig(layer="mamba2", d_state=128, headdim=64, chunk_size=256)
    ),
}
IMPLS = {"mamba1": ("ours", "hf-slow", "hf-mambapy"), "mamba2": ("ours", "hf-torch")}
QUICK_SHAPES = ("debug", "debug-mamba2")
QUICK_SEQLENS = (512,)
SEED = 0
SETUP_TIMEOUT_S = 300.0  # import + build (+ load) of one case; far above the ~10 s a 130m takes
POLL_S = 0.5  # how often the parent checks a running case's memory


@dataclass(frozen=True)
class Case:
    shape: str
    cfg: MambaConfig
    seqlen: int
    impl: str


@dataclass
class Result:
    tok_s: float | None = None
    s_iter: float | None = None
    iters: str = "-"
    best_tok_s: float | None = None
    rss_delta_mb: float | None = None
    peak_rss_gb: float | None = None
    status: str = ""  # empty when measured; else what stands in the tok/s column
    note: str = ""


# ----------------------------------------------------------------------------------------------
# The measured process


def build_model(case: Case, hf_dir: Path | None) -> nn.Module:
    """Our model, or HF's loaded from our export of the same seeded model (``hf_dir``)."""
    if case.impl == "ours":
        torch.manual_seed(SEED)
        return MambaLMHeadModel(case.cfg)
    import transformers

    transformers.logging.set_verbosity_error()
    extra = {"use_mambapy": case.impl == "hf-mambapy"} if case.cfg.ssm.layer == "mamba1" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, **extra)


def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    if isinstance(model, MambaLMHeadModel):
        return model(ids)
    return model(input_ids=ids, use_cache=False).logits


def train_step(model: nn.Module, ids: Tensor, targets: Tensor) -> float:
    """Seconds for forward + mean cross-entropy + backward."""
    start = time.perf_counter()
    logits = logits_of(model, ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def case_worker(
    conn: Connection, case: Case, hf_dir: Path | None, iters: int, budget_s: float, threads: int, batch: int
) -> None:
    """Child process: report ("setup", s), ("warmup", s), then ("done", dict) or ("error", text)."""
    try:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(case, hf_dir)
        model.train()
        gen = torch.Generator().manual_seed(SEED)
        vocab = case.cfg.vocab_size
        ids = torch.randint(0, vocab, (batch, case.seqlen), generator=gen)
        targets = torch.randint(0, vocab, (batch, case.seqlen), generator=gen)
        conn.send(("setup", time.perf_counter() - start))

        gc.collect()
        can_reset = reset_peak_rss()
        base_kb = proc_status_kb("VmRSS")
        warmup = train_step(model, ids, targets)
        conn.send(("warmup", warmup))
        times: list[float] = []
        elapsed = warmup
        while len(times) < iters:
            expected = statistics.median(times) if times else warmup
            if elapsed + expected > budget_s:
                break
            times.append(train_step(model, ids, targets))
            elapsed += times[-1]
        peak_kb = proc_status_kb("VmHWM")
        rss_delta_kb = peak_kb - base_kb if can_reset else None
        conn.send(
            ("done", {"warmup": warmup, "times": times, "rss_delta_kb": rss_delta_kb, "peak_kb": peak_kb})
        )
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------
# The parent: one process per case, stopped when over budget or over the memory guard


def wait_for(
    conn: Connection, proc: mp.process.BaseProcess, timeout: float, rss_limit_kb: int
) -> tuple[str, object]:
    """The child's next message, or ("timeout", None) / ("rss", kB) / ("died", exitcode)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if conn.poll(min(POLL_S, remaining)):
            try:
                return conn.recv()
            except EOFError:
                proc.join()
                return "died", proc.exitcode
        rss_kb = proc_status_kb("VmRSS", proc.pid)
        if rss_kb > rss_limit_kb:
            return "rss", rss_kb
    return "timeout", None


def run_case(case: Case, hf_dir: Path | None, args: argparse.Namespace) -> Result:
    if case.impl == "hf-mambapy" and importlib.util.find_spec("mambapy") is None:
        return Result(status="n/a", note="mambapy not installed (pip install mambapy)")
    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=case_worker,
        args=(send_end, case, hf_dir, args.iters, args.budget_s, args.threads, args.batch),
        daemon=True,
    )
    proc.start()
    send_end.close()
    rss_limit_kb = int(args.max_rss_gb * 2**20)
    try:
        kind, payload = wait_for(recv_end, proc, SETUP_TIMEOUT_S, rss_limit_kb)
        if kind == "timeout":
            return Result(status="error", note=f"building the model took > {SETUP_TIMEOUT_S:g} s")
        if kind == "setup":
            kind, payload = wait_for(recv_end, proc, args.budget_s, rss_limit_kb)
            if kind == "warmup":
                kind, payload = wait_for(recv_end, proc, args.budget_s + SETUP_TIMEOUT_S, rss_limit_kb)
        return interpret(case, kind, payload, args)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv_end.close()


def interpret(case: Case, kind: str, payload: object, args: argparse.Namespace) -> Result:
    if kind == "done":
        assert isinstance(payload, dict)
        times = payload["times"] or [payload["warmup"]]
        median = statistics.median(times)
        rss = payload["rss_delta_kb"]
        tokens = case.seqlen * args.batch
        return Result(
            tok_s=tokens / median,
            s_iter=median,
            iters=str(len(payload["times"])) if payload["times"] else "1*",
            best_tok_s=tokens / min(times),
            rss_delta_mb=rss / 1024 if rss is not None else None,
            peak_rss_gb=payload["peak_kb"] / 2**20,
            note="" if payload["times"] else "warm-up step only: a second step would pass the budget",
        )
    if kind == "timeout":
        return Result(
            status=f"skipped (> {args.budget_s:g} s)",
            note=f"one step > {args.budget_s:g} s: < {case.seqlen / args.budget_s:.1f} tok/s",
        )
    if kind == "rss":
        assert isinstance(payload, int)
        return Result(
            status="skipped (RSS)", note=f"passed --max-rss-gb {args.max_rss_gb:g} ({payload / 2**20:.1f} GB)"
        )
    if kind == "error":
        assert isinstance(payload, str)
        return Result(status="error", note=payload.strip().splitlines()[-1])
    return Result(status="error", note=f"process ended with exit code {payload} (out of memory?)")


# ----------------------------------------------------------------------------------------------
# Table


COLUMNS = (
    ("shape", 13),
    ("layers", 7),
    ("seq", 6),
    ("impl", 11),
    ("tok/s", 18),
    ("s/iter", 8),
    ("iters", 6),
    ("best", 9),
    ("vs ours", 8),
    ("peak RSS Δ", 11),
    ("peak RSS", 9),
)


def format_row(values: list[str]) -> str:
    cells = [v.ljust(w) for v, (_, w) in zip(values, COLUMNS)]
    return "  ".join(cells + values[len(COLUMNS) :]).rstrip()


def row(case: Case, full_layers: int, r: Result, ours_tok_s: float | None) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    ratio = r.tok_s / ours_tok_s if r.tok_s is not None and ours_tok_s else None
    return format_row(
        [
            case.shape,
            f"{case.cfg.n_layer}/{full_layers}" if case.cfg.n_layer != full_layers else str(full_layers),
            str(case.seqlen),
            case.impl,
            r.status or num(r.tok_s, ".1f"),
            num(r.s_iter, ".3f"),
            r.iters,
            num(r.best_tok_s, ".1f"),
            num(ratio, ".2f"),
            "-" if r.rss_delta_mb is None else f"{r.rss_delta_mb:.0f} MB",
            "-" if r.peak_rss_gb is None else f"{r.peak_rss_gb:.2f} GB",
            r.note,
        ]
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def header(args: argparse.Namespace, shapes: list[str]) -> list[str]:
    import transformers

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"# Training step (forward + mean CE + backward) throughput, CPU, fp32, batch {args.batch}",
        f"# torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads} "
        f"(of {os.cpu_count()} cores), CPU: {cpu_model()}",
        f"# budget {args.budget_s:g} s per case (warm-up + timed steps), 1 warm-up + up to {args.iters} "
        f"timed steps, memory guard {args.max_rss_gb:g} GB RSS, load average at start {load}",
    ]
    if args.layers is not None:
        full = ", ".join(f"{s} {SHAPES[s].n_layer}" for s in shapes)
        lines.append(
            f"# TRUNCATED MODELS: every shape runs with n_layer={args.layers} (full depth: {full}); "
            "tok/s is not a full model's"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    avail_gb = proc_meminfo_gb("MemAvailable")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SHAPES)} at seq 512")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--impls", nargs="+", choices=sorted({i for v in IMPLS.values() for i in v}), default=None)
    p.add_argument("--layers", type=int, default=None, help="truncate every shape to this many layers")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--iters", type=int, default=5, help="timed steps after the warm-up (at most)")
    p.add_argument("--budget-s", type=float, default=60.0, help="seconds of stepping per case")
    p.add_argument("--threads", type=int, default=cores, help=f"torch threads (default: {cores} cores)")
    p.add_argument(
        "--max-rss-gb",
        type=float,
        default=round(0.7 * avail_gb, 1),
        help="stop a case whose process passes this resident memory (default: 70%% of MemAvailable)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.seqlens = list(QUICK_SHAPES), list(QUICK_SEQLENS)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers {args.layers} must be >= 1")
    if args.iters < 1 or args.budget_s <= 0 or args.batch < 1:
        p.error("--iters and --batch must be >= 1 and --budget-s > 0")
    return args


def proc_meminfo_gb(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    raise ValueError(f"/proc/meminfo has no {field}")


def export_for_hf(cfg: MambaConfig, out_dir: Path) -> Path:
    """Our seeded model (the one ``ours`` builds) exported as an HF directory."""
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_hf(MambaLMHeadModel(cfg), out_dir)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for line in header(args, args.shapes):
        print(line, flush=True)
    print(format_row([name for name, _ in COLUMNS] + ["note"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for shape in args.shapes:
            full = SHAPES[shape]
            cfg = full if args.layers is None else replace(full, n_layer=args.layers)
            impls = [i for i in IMPLS[cfg.ssm.layer] if args.impls is None or i in args.impls]
            hf_dir = export_for_hf(cfg, Path(tmp) / shape) if any(i != "ours" for i in impls) else None
            for seqlen in args.seqlens:
                ours_tok_s = None
                for impl in impls:
                    case = Case(shape, cfg, seqlen, impl)
                    result = run_case(case, hf_dir, args)
                    if impl == "ours":
                        ours_tok_s = result.tok_s
                    print(row(case, full.n_layer, result, ours_tok_s), flush=True)
    print(f"# load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
