"""Peak memory and wall time of reading a checkpoint: resume, init_from and evaluation (CPU).

    nice python benchmarks/bench_checkpoint_io.py --dir /work/tmp-ckpt                  # the 1.6B preset
    nice python benchmarks/bench_checkpoint_io.py --dir /tmp/x --n-layer 4              # a truncated 1.6B
    nice python benchmarks/bench_checkpoint_io.py --dir /tmp/x --before /work/main      # and main's code

A monolithic Composer checkpoint of the ``1.6b`` preset (random weights, fp32; model state only,
as ``init_from`` and evaluation read it; about 6.5 GB) is written tensor by tensor from a model
built on the meta device, then each case runs in fresh child processes (one, then two at once
as two ranks of a node would) that import the code under test (``--before``: another checkout,
e.g. main, for the "before" rows) and report their peak resident memory (``VmHWM``: the whole
process, file-backed pages included) and the load's wall time:

- ``resume``: what a restart does with its latest checkpoint: recovery's integrity check, the
  plan's checks (integrity, shapes) and Composer's own load (``safe_torch_load``) into the
  model that the Trainer built;
- ``init_from``: ``read_weights`` + ``select_weights`` + ``load_into`` a freshly built model;
- ``evaluate``: ``eval.sources.load_source`` (a model in eval mode).

``x ckpt`` is the peak divided by the checkpoint's size (target: <= 1.3); ``base`` is the
process's resident memory after its imports, before the load (torch alone is about 0.5 GB).
The file is deleted at the end. The machine these figures come from is shared: wall times vary
with its load (printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
case, path = sys.argv[1], Path(sys.argv[2])
from models.config import MambaConfig
from models.mamba_lm import MambaLMHeadModel
base = status("VmRSS")
t0 = time.perf_counter()
if case == "evaluate":
    from eval.sources import load_source
    model = load_source(str(path)).model
elif case == "init_from":
    from handover.weights import read_weights
    from handover.init_from import InitFromConfig, load_into, select_weights
    ckpt = read_weights(str(path))
    model = MambaLMHeadModel(ckpt.config)
    weights = select_weights(InitFromConfig(path=str(path)), ckpt.config, ckpt, model.state_dict())
    load_into(model, weights)
else:  # resume
    from handover.integrity import recover_checkpoint_folder, shape_problems
    from composer.utils.checkpoint import safe_torch_load
    from handover.weights import read_weights  # noqa: F401 (imports as the Trainer would)
    recover_checkpoint_folder(path.parent)
    try:
        from handover.reader import install_checkpoint_reads, verify
        verify(path)
        install_checkpoint_reads()
        own = {"trust": True}
    except ImportError:  # main's code: the plan checks the file again
        from handover.integrity import checkpoint_problem
        checkpoint_problem(path)
        own = {}
    from common.config import config_from_dict
    cfg = config_from_dict(MambaConfig, json.loads(sys.argv[3]))
    model = MambaLMHeadModel(cfg)  # the Trainer builds the model before it loads
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert not shape_problems(path, expected, "resume", **own)
    state = safe_torch_load(str(path))["state"]["model"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    del state
wall = time.perf_counter() - t0
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"peak": status("VmHWM"), "base": base, "wall": wall, "params": n}))
"""


def write_checkpoint(path: Path, cfg_overrides: dict) -> tuple[int, dict]:
    """A Composer-format checkpoint of the preset with random weights, one tensor allocated at a time."""
    import torch

    from common.config import to_dict
    from handover.record import RECORD
    from models.config import preset
    from models.mamba_lm import MambaLMHeadModel

    cfg = preset("1.6b", **cfg_overrides)
    with torch.device("meta"):
        model = MambaLMHeadModel(cfg)
    model_state = {}
    gen = torch.Generator().manual_seed(0)
    for name, tensor in model.state_dict().items():
        model_state["model." + name] = torch.empty(tensor.shape, dtype=tensor.dtype).normal_(
            0, 0.02, generator=gen
        )
    record = {"model_config_json": json.dumps(to_dict(cfg), sort_keys=True), "tokenizer": ""}
    state = {
        "state": {
            "model": model_state,
            "callbacks": {RECORD: record},
            "timestamp": {"Timestamp": {"epoch": 0, "batch": 100, "sample": 0, "token": 0}},
            "run_name": "bench",
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    del state, model_state
    return path.stat().st_size, to_dict(cfg)


def run_case(code_root: Path, case: str, path: Path, cfg: dict, ranks: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, case, str(path), json.dumps(cfg)],
            cwd=code_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(ranks)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{case} ({code_root}) failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="folder for the checkpoint (deleted afterwards)")
    parser.add_argument(
        "--n-layer", type=int, default=0, help="truncate the preset to this many blocks (0: 28)"
    )
    parser.add_argument(
        "--before", help="a checkout of the code before (e.g. /work/main) for the 'before' rows"
    )
    parser.add_argument("--cases", default="resume,init_from,evaluate")
    parser.add_argument("--ranks", default="1,2")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    path = Path(args.dir) / "checkpoints" / "ep0-ba100-rank0.pt"
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    size, cfg = write_checkpoint(path, overrides)
    (path.parent / "latest-rank0.pt").symlink_to(path.name)
    print(
        f"checkpoint: 1.6b preset{f' truncated to {args.n_layer} blocks' if args.n_layer else ''}, "
        f"{size / 2**30:.2f} GiB, written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    codes = [("after", ROOT)] + ([("before", Path(args.before))] if args.before else [])
    rows = []
    try:
        for case in args.cases.split(","):
            for ranks in (int(r) for r in args.ranks.split(",")):
                for label, root in codes:
                    res = run_case(root, case, path, cfg, ranks)
                    peak = max(r["peak"] for r in res)
                    rows.append(
                        (case, ranks, label, peak, max(r["base"] for r in res), max(r["wall"] for r in res))
                    )
                    print(f"  {case} x{ranks} {label}: peak {peak / 2**30:.2f} GiB", flush=True)
    finally:
        for p in path.parent.iterdir():
            p.unlink()
    print("\n| case | ranks | code | peak RSS / process (GiB) | x ckpt | base (GiB) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for case, ranks, label, peak, base, wall in rows:
        print(
            f"| {case} | {ranks} | {label} | {peak / 2**30:.2f} | {peak / size:.2f} | {base / 2**30:.2f} | {wall:.1f} |"
        )
    print(f"\ncheckpoint {size / 2**30:.2f} GiB; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
