"""One mixer block at 130m width, training step on the CPU: ours, HF transformers' peers, and the GEMM ceiling.

A training step is forward + backward of one mixer on a (batch, seq, d_model) input that needs
its gradient, with a fixed random output gradient; fp32. Every case runs in a fresh process
(one warm-up step, then up to ``--iters`` timed steps inside ``--budget-s``).

Blocks (the ``block`` column), both at the 130m width d_model 768 (d_inner 1536):

- ``mamba1``: d_state 16, dt_rank 48, d_conv 4 (mamba-130m).
- ``mamba2``: d_state 128, headdim 64 (24 heads), ngroups 1, chunk 256 (``--mamba2-chunk``).

Implementations (the ``impl`` column), all over the same weights (HF's are loaded from our
``export_hf`` of a one-layer model):

- ``ours``        our ``Mamba1Mixer`` / ``Mamba2Mixer`` on the PyTorch path (``impl=torch``);
                  Mamba-1 runs the fused C scan (models/cpu_scan.py) when it is built.
- ``ours-loop``   ours with ``MAMBA_RECIPES_CPU_SCAN=torch``: the PyTorch scan loop (Mamba-1).
- ``hf-mambapy``  HF ``MambaMixer`` with ``use_mambapy=True`` in train mode (mamba.py's
                  parallel scan; needs the ``mambapy`` package, installed by make install).
- ``hf-slow``     HF ``MambaMixer``'s default sequential ``slow_forward``.
- ``hf-torch``    HF ``Mamba2Mixer.torch_forward``.
- ``gemm``        the ceiling: only the block's matrix products (in_proj, x_proj, dt_proj,
                  out_proj for Mamba-1; in_proj, out_proj for Mamba-2), forward and both
                  backward products (input and weight gradients), at the same shapes, on
                  preallocated tensors. Its GFLOP/s is printed in the note.

Columns: ``tok/s`` = batch * seq / median step time; ``best`` = from the fastest step (on a
shared machine the better estimate of an idle one); ``vs ours`` = this row's tok/s over ours;
``of gemm`` = this row's tok/s over the ``gemm`` row's: the fraction of the block's own
matrix-product ceiling reached; ``peak RSS Δ`` = the process's peak resident memory during the
steps above its memory after building (activations, gradients, temporaries). A case whose
warm-up does not finish in the budget is ``skipped``. The header and footer print the load
average; a separate line measures the machine's fp32 matrix-product rate (a 2048^3 product).

    python benchmarks/bench_block.py                         # everything (about 15 min on 2 cores)
    python benchmarks/bench_block.py --blocks mamba1 --seqlens 512 --batches 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import cpu_model, proc_meminfo_gb, proc_status_kb, reset_peak_rss, wait_for

from common import cli
from models.config import MambaConfig, SSMConfig, preset

IMPLS = {
    "mamba1": ("ours", "ours-loop", "hf-mambapy", "hf-slow", "gemm"),
    "mamba2": ("ours", "hf-torch", "gemm"),
}
SEED = 0
SETUP_TIMEOUT_S = 300.0


def block_config(block: str, mamba2_chunk: int) -> MambaConfig:
    """A one-layer model at the 130m width; the vocabulary is small (no mixer depends on it)."""
    if block == "mamba1":
        return preset("130m", n_layer=1, vocab_size=512, impl="torch")
    ssm = SSMConfig(layer="mamba2", d_state=128, headdim=64, chunk_size=mamba2_chunk)
    return preset("130m", n_layer=1, vocab_size=512, impl="torch", ssm=ssm)


@dataclass(frozen=True)
class Case:
    block: str
    cfg: MambaConfig
    seqlen: int
    batch: int
    impl: str


# ----------------------------------------------------------------------------------------------
# The measured process


def gemm_shapes(cfg: MambaConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of every matrix product of one mixer, in order."""
    D, E, N = cfg.d_model, cfg.d_inner, cfg.ssm.d_state
    if cfg.ssm.layer == "mamba1":
        R = cfg.dt_rank
        return [(D, 2 * E), (E, R + 2 * N), (R, E), (E, D)]
    G, H = cfg.ssm.ngroups, cfg.nheads
    return [(D, 2 * E + 2 * G * N + H), (E, D)]


class GemmOnly:
    """The block's matrix products alone: y = x W^T, dx = dy W, dW = dy^T x, for each layer."""

    def __init__(self, cfg: MambaConfig, tokens: int) -> None:
        gen = torch.Generator().manual_seed(SEED)
        self.layers = []
        for fan_in, fan_out in gemm_shapes(cfg):
            x, w = torch.randn(tokens, fan_in, generator=gen), torch.randn(fan_out, fan_in, generator=gen)
            dy = torch.randn(tokens, fan_out, generator=gen)
            out = (torch.empty(tokens, fan_out), torch.empty(tokens, fan_in), torch.empty(fan_out, fan_in))
            self.layers.append((x, w, dy, out))
        self.flops = sum(6 * tokens * i * o for i, o in gemm_shapes(cfg))

    def step(self) -> None:
        for x, w, _, (y, _, _) in self.layers:
            torch.mm(x, w.t(), out=y)
        for x, w, dy, (_, dx, dw) in reversed(self.layers):
            torch.mm(dy, w, out=dx)
            torch.mm(dy.t(), x, out=dw)


def build_mixer(case: Case, hf_dir: Path | None) -> nn.Module:
    if case.impl in ("ours", "ours-loop"):
        from models.mamba_lm import MambaLMHeadModel

        torch.manual_seed(SEED)
        return MambaLMHeadModel(case.cfg).backbone.layers[0].mixer
    import transformers

    transformers.logging.set_verbosity_error()
    extra = {"use_mambapy": case.impl == "hf-mambapy"} if case.block == "mamba1" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, **extra)
    return model.backbone.layers[0].mixer


def case_worker(
    conn: Connection, case: Case, hf_dir: Path | None, iters: int, budget_s: float, threads: int
) -> None:
    """Child process: ("setup", s), ("warmup", s), then ("done", dict) or ("error", text)."""
    try:
        if case.impl == "ours-loop":
            os.environ["MAMBA_RECIPES_CPU_SCAN"] = "torch"
        torch.set_num_threads(threads)
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(SEED)
        shape = (case.batch, case.seqlen, case.cfg.d_model)
        if case.impl == "gemm":
            gemm = GemmOnly(case.cfg, case.batch * case.seqlen)
            step_fn, flops = gemm.step, gemm.flops
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mixer = build_mixer(case, hf_dir).train()
            h = torch.randn(*shape, generator=gen).requires_grad_(True)
            grad_out = torch.randn(*shape, generator=gen)

            def step_fn() -> None:
                out = mixer(h)
                out.backward(grad_out)
                mixer.zero_grad(set_to_none=True)
                h.grad = None

            flops = None
        conn.send(("setup", time.perf_counter() - start))

        can_reset = reset_peak_rss()
        base_kb = proc_status_kb("VmRSS")
        t0 = time.perf_counter()
        step_fn()
        warmup = time.perf_counter() - t0
        conn.send(("warmup", warmup))
        times: list[float] = []
        elapsed = warmup
        while len(times) < iters:
            if elapsed + (statistics.median(times) if times else warmup) > budget_s:
                break
            t0 = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - t0)
            elapsed += times[-1]
        rss = proc_status_kb("VmHWM") - base_kb if can_reset else None
        conn.send(("done", {"warmup": warmup, "times": times, "rss_delta_kb": rss, "flops": flops}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` fp32 (size x size) @ (size x size) products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The parent


@dataclass
class Result:
    tok_s: float | None = None
    best: float | None = None
    s_iter: float | None = None
    iters: str = "-"
    rss_mb: float | None = None
    status: str = ""
    note: str = ""


def run_case(case: Case, hf_dir: Path | None, args: argparse.Namespace) -> Result:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=case_worker,
        args=(send_end, case, hf_dir, args.iters, args.budget_s, args.threads),
        daemon=True,
    )
    proc.start()
    send_end.close()
    limit_kb = int(args.max_rss_gb * 2**20)
    try:
        kind, payload = wait_for(recv_end, proc, SETUP_TIMEOUT_S, limit_kb)
        if kind == "setup":
            kind, payload = wait_for(recv_end, proc, args.budget_s, limit_kb)
            if kind == "warmup":
                kind, payload = wait_for(recv_end, proc, args.budget_s + SETUP_TIMEOUT_S, limit_kb)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv_end.close()
    tokens = case.batch * case.seqlen
    if kind == "done":
        times = payload["times"] or [payload["warmup"]]
        median = statistics.median(times)
        rss = payload["rss_delta_kb"]
        note = ""
        if payload["flops"]:
            note = f"{payload['flops'] / median / 1e9:.0f} GFLOP/s in the block's GEMMs"
        if not payload["times"]:
            note = "warm-up step only (a second step would pass the budget)"
        return Result(
            tok_s=tokens / median,
            best=tokens / min(times),
            s_iter=median,
            iters=str(len(payload["times"])) if payload["times"] else "1*",
            rss_mb=None if rss is None else rss / 1024,
            note=note,
        )
    if kind == "timeout":
        return Result(status=f"skipped (> {args.budget_s:g} s)", note=f"< {tokens / args.budget_s:.1f} tok/s")
    if kind == "rss":
        return Result(status="skipped (RSS)", note=f"passed --max-rss-gb {args.max_rss_gb:g}")
    if kind == "error":
        return Result(status="error", note=str(payload).strip().splitlines()[-1])
    return Result(status="error", note=f"process ended ({kind}, {payload})")


COLUMNS = (
    ("block", 7),
    ("seq", 5),
    ("batch", 6),
    ("impl", 11),
    ("tok/s", 18),
    ("best", 8),
    ("s/iter", 7),
    ("iters", 6),
    ("vs ours", 8),
    ("of gemm", 8),
    ("peak RSS Δ", 11),
)


def format_row(values: list[str]) -> str:
    cells = [v.ljust(w) for v, (_, w) in zip(values, COLUMNS)]
    return "  ".join(cells + values[len(COLUMNS) :]).rstrip()


def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def export_block(cfg: MambaConfig, out_dir: Path) -> Path:
    from handover.hf_mamba import export_hf
    from models.mamba_lm import MambaLMHeadModel

    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_hf(MambaLMHeadModel(cfg), out_dir)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0))
    p = cli.parser("python benchmarks/bench_block.py", __doc__)
    p.add_argument("--blocks", nargs="+", choices=list(IMPLS), default=list(IMPLS), help="which mixers")
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 2048], help="sequence lengths")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="batch sizes")
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations (default: all)")
    p.add_argument("--iters", type=int, default=5, help="timed steps after the warm-up (at most)")
    p.add_argument("--budget-s", type=float, default=60.0, help="seconds of stepping per case")
    p.add_argument("--threads", type=int, default=cores, help="torch intra-op threads in every case")
    p.add_argument("--mamba2-chunk", type=int, default=256, help="Mamba-2 SSD chunk length")
    p.add_argument(
        "--max-rss-gb",
        type=float,
        default=round(0.7 * proc_meminfo_gb("MemAvailable"), 1),
        help="stop a case whose process passes this resident memory (default: 70%% of MemAvailable)",
    )
    args = p.parse_args(argv)
    if args.iters < 1 or args.budget_s <= 0 or args.threads < 1:
        raise cli.UserError("--iters and --threads must be >= 1 and --budget-s > 0")
    known = {i for impls in IMPLS.values() for i in impls}
    if args.impls and not set(args.impls) <= known:
        raise cli.UserError(
            f"--impls {' '.join(sorted(set(args.impls) - known))}: not one of {sorted(known)}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    import transformers

    args = parse_args(argv)
    print(
        "# One mixer block at 130m width (d_model 768): training step (forward + backward), CPU, fp32",
        flush=True,
    )
    print(
        f"# torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads} "
        f"(of {len(os.sched_getaffinity(0))} cores), CPU: {cpu_model()}",
        flush=True,
    )
    print(f"# budget {args.budget_s:g} s per case, 1 warm-up + up to {args.iters} timed steps", flush=True)
    print(f"# load average at start {load_average()}", flush=True)
    print(
        f"# fp32 matrix product 2048^3: {matmul_peak(args.threads):.0f} GFLOP/s on {args.threads} threads",
        flush=True,
    )
    print(format_row([c for c, _ in COLUMNS] + ["note"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_block_") as tmp:
        for block in args.blocks:
            cfg = block_config(block, args.mamba2_chunk)
            impls = [i for i in IMPLS[block] if args.impls is None or i in args.impls]
            hf_dir = export_block(cfg, Path(tmp) / block) if any(i.startswith("hf") for i in impls) else None
            for seqlen in args.seqlens:
                for batch in args.batches:
                    results = {
                        impl: run_case(Case(block, cfg, seqlen, batch, impl), hf_dir, args) for impl in impls
                    }
                    ours = results.get("ours", Result()).tok_s
                    gemm = results.get("gemm", Result()).tok_s
                    for impl, r in results.items():
                        vs = r.tok_s / ours if r.tok_s and ours else None
                        of_gemm = r.tok_s / gemm if r.tok_s and gemm and impl != "gemm" else None
                        print(
                            format_row(
                                [
                                    block,
                                    str(seqlen),
                                    str(batch),
                                    impl,
                                    r.status or num(r.tok_s, ".1f"),
                                    num(r.best, ".1f"),
                                    num(r.s_iter, ".3f"),
                                    r.iters,
                                    num(vs, ".2f"),
                                    num(of_gemm, ".2f"),
                                    "-" if r.rss_mb is None else f"{r.rss_mb:.0f} MB",
                                    r.note,
                                ]
                            ),
                            flush=True,
                        )
    print(f"# load average at end {load_average()}", flush=True)


if __name__ == "__main__":
    cli.run(main)
