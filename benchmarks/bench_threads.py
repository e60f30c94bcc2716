"""The demo model's training step by intra-op thread count, with and without a competing load.

What ``common/threads.py`` decides at start-up matters most on a small shared machine: with
other jobs on the cores, threads that wait for a descheduled sibling spin in OpenMP barriers.
This times the demo's model (yamls/tiny: d_model 128, 4 layers, vocab 4096; batch 4 x 256;
forward + cross-entropy + backward + AdamW step) in a fresh process per thread count, first on
the machine as it is, then with ``--load`` busy processes started beside it (each spins in
pure Python on the CPU, as another user's job would). Tokens/s is the median over the timed
steps. The choice train.py makes for this machine is printed under the table.

    python benchmarks/bench_threads.py                       # threads 1 and all cores, load 0 and 2
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import cli
from common.threads import decide_threads
from models.config import SSMConfig, preset

SEQ, BATCH = 256, 4


def spin(stop: mp.synchronize.Event) -> None:
    """A competing job: pure-Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x += i * i


def step_worker(threads: int, steps: int, out: mp.Queue) -> None:
    from models.mamba_lm import MambaLMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset("debug", d_model=128, n_layer=4, vocab_size=4096, ssm=SSMConfig(d_state=16), impl="torch")
    model = MambaLMHeadModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    out.put(BATCH * SEQ / statistics.median(times))


def measure(threads: int, load: int, steps: int) -> float:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=spin, args=(stop,), daemon=True) for _ in range(load)]
    for h in hogs:
        h.start()
    try:
        out = ctx.Queue()
        worker = ctx.Process(target=step_worker, args=(threads, steps, out))
        worker.start()
        tok_s = out.get()
        worker.join()
        return tok_s
    finally:
        stop.set()
        for h in hogs:
            h.join()


def main(argv: list[str] | None = None) -> None:
    cores = len(os.sched_getaffinity(0))
    p = cli.parser("python benchmarks/bench_threads.py", __doc__)
    p.add_argument("--threads", nargs="+", type=int, default=sorted({1, cores}), help="thread counts")
    p.add_argument("--loads", nargs="+", type=int, default=[0, cores], help="competing busy processes")
    p.add_argument("--steps", type=int, default=8, help="timed steps per case")
    args = p.parse_args(argv)
    if min(args.threads) < 1 or min(args.loads) < 0 or args.steps < 1:
        raise cli.UserError("--threads and --steps must be >= 1, --loads >= 0")
    print(
        f"# demo model training step, batch {BATCH} x {SEQ}, fp32; {cores} cores in this process's affinity"
    )
    print(f"{'load':>5} {'threads':>8} {'tok/s':>9}  load average before")
    for load in args.loads:
        for threads in args.threads:
            before = " ".join(f"{x:.2f}" for x in os.getloadavg())
            tok_s = measure(threads, load, args.steps)
            print(f"{load:>5} {threads:>8} {tok_s:>9,.0f}  {before}", flush=True)
    n, why = decide_threads(None)
    print(f"# train.py here would use {n} thread(s) per rank ({why})")


if __name__ == "__main__":
    cli.run(main)
