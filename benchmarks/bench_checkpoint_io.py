"""Peak memory and wall time of reading a checkpoint: resume, init_from and evaluation (CPU).

    nice python benchmarks/bench_checkpoint_io.py --dir /work/tmp-ckpt                  # the 1.6B preset
    nice python benchmarks/bench_checkpoint_io.py --dir /tmp/x --n-layer 4              # a truncated 1.6B
    nice python benchmarks/bench_checkpoint_io.py --dir /tmp/x --before /work/main      # and main's code

A monolithic Composer checkpoint of the ``1.6b`` preset (random weights, fp32; model state only,
as ``init_from`` and evaluation read it; about 6.5 GB) and, for the two-rank rows, a sharded
(DCP) one of the same model written by two processes (each builds and writes only its rows).
Each case runs in fresh child processes that import the code under test (``--before``: another
checkout, e.g. main, for the "before" rows) and report their peak resident memory (``VmHWM``:
the whole process, file-backed pages of a mapped checkpoint included) and the load's wall time:

- ``resume``, one rank: what a restart does with its latest checkpoint: recovery's integrity
  check, the plan's checks (integrity, shapes) and Composer's own load (``safe_torch_load``)
  into the model that the Trainer built; two ranks: an FSDP2 run (gloo, the model built on meta
  and sharded per block) resuming from the sharded checkpoint: the plan's checks, then
  ``torch.distributed.checkpoint.load`` of each rank's shards, as Composer does;
- ``init_from``, one rank: ``read_weights`` + ``select_weights`` + ``load_into`` a freshly built
  model; two ranks: the same FSDP2 run, from the monolithic and from the sharded checkpoint
  (after: ``LoadShards``, each rank its own rows; before: every rank loads the whole model,
  then it is sharded);
- ``evaluate``: ``eval.sources.load_source`` (a model in eval mode), one process per model (two
  ranks: two at once).

``x ckpt`` is the peak divided by the checkpoint's size (target: <= 1.3); ``base`` is the
process's resident memory after its imports, before the load (torch alone is about 0.5 GB).
Before each case the free memory is checked against what it needs (``NEED``); a case the
machine cannot hold now is listed as not run. ``--keep`` keeps the checkpoints for a next run.
The machine these figures come from is shared: wall times vary with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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
case, path, cfg_json, fsdp = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
from common.config import config_from_dict
from models.config import MambaConfig
from models.mamba_lm import MambaLMHeadModel
cfg = config_from_dict(MambaConfig, json.loads(cfg_json))
try:
    from handover.init_from import LoadShards
except ImportError:  # main's code: under FSDP every rank loads the whole model, then it is sharded
    LoadShards = None

def shard(model):
    from torch.distributed.fsdp import fully_shard
    from models.mamba_lm import Block
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)
    return model

if fsdp:  # a rank of an FSDP2 run: the model built on meta and sharded per block, as Composer does
    import torch.distributed as tdist
    tdist.init_process_group("gloo")
    if case != "init_from" or LoadShards is not None:
        with torch.device("meta"):
            model = shard(MambaLMHeadModel(cfg))
        model.to_empty(device="cpu")  # this rank's rows only, uninitialised (param_init_fn's job)
base = status("VmRSS")
t0 = time.perf_counter()
if case == "evaluate":
    from eval.sources import load_source
    model = load_source(str(path)).model
elif case == "init_from" and fsdp and LoadShards is not None:
    from handover.weights import read_weights
    from handover.init_from import InitFromConfig, select_weights
    ckpt = read_weights(str(path), lazy_shards=True)
    with torch.device("meta"):
        shapes = MambaLMHeadModel(cfg).state_dict()
    weights = select_weights(InitFromConfig(path=str(path)), ckpt.config, ckpt, shapes)
    LoadShards(model, weights, ckpt, "").before_load(None, None)
elif case == "init_from":
    from handover.weights import read_weights
    from handover.init_from import InitFromConfig, load_into, select_weights
    ckpt = read_weights(str(path))
    model = MambaLMHeadModel(ckpt.config)
    weights = select_weights(InitFromConfig(path=str(path)), ckpt.config, ckpt, model.state_dict())
    load_into(model, weights)
    if fsdp:
        shard(model)
elif fsdp:  # resume from a sharded checkpoint: the plan's checks, then Composer's load (dcp.load)
    import torch.distributed.checkpoint as dcp
    from handover.integrity import shape_problems
    from handover.reader import verify
    verify(path)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in MambaLMHeadModel(cfg).state_dict().items()}
    assert not shape_problems(path, expected, "resume", trust=True)
    sd = {"state": {"model": {"model." + k: v for k, v in model.state_dict().items()}}}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)))
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
    model = MambaLMHeadModel(cfg)  # the Trainer builds the model before it loads
    try:
        from handover.reader import release_pages_while_loading
        release_pages_while_loading(model)  # as recipes/train.py does
    except ImportError:  # main's code
        pass
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert not shape_problems(path, expected, "resume", **own)
    state = safe_torch_load(str(path))["state"]["model"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    del state
wall = time.perf_counter() - t0
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"peak": status("VmHWM"), "base": base, "wall": wall, "params": n}))
"""

WRITER = r"""
import json, sys
from pathlib import Path
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from common.config import config_from_dict
from handover.record import RECORD
from models.config import MambaConfig
from models.mamba_lm import Block, MambaLMHeadModel
torch.set_num_threads(1)
folder, cfg_json = Path(sys.argv[1]), sys.argv[2]
tdist.init_process_group("gloo")
with torch.device("meta"):
    model = MambaLMHeadModel(config_from_dict(MambaConfig, json.loads(cfg_json)))
for module in model.modules():
    if isinstance(module, Block):
        fully_shard(module)
fully_shard(model)
model.to_empty(device="cpu")
gen = torch.Generator().manual_seed(tdist.get_rank())
with torch.no_grad():
    for p in model.parameters():
        p.to_local().normal_(0, 0.02, generator=gen)
record = {"model_config_json": cfg_json, "tokenizer": ""}
state = {"model": {"model." + k: v for k, v in model.state_dict().items()}, "callbacks": {RECORD: record}}
dcp.save({"state": state}, checkpoint_id=str(folder))
"""


def write_sharded(folder: Path, cfg: dict, ranks: int = 2) -> int:
    """A sharded (DCP) checkpoint of the same model, as an FSDP2 run of ``ranks`` processes writes it:
    each process builds and writes only its own rows (random, fp32)."""
    script = folder.parent / "write_sharded.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        f"--master-port={free_port()}",
    ]
    subprocess.run([*cmd, str(script), str(folder), json.dumps(cfg)], check=True, cwd=ROOT, env=env)
    return sum(p.stat().st_size for p in folder.iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# Anonymous memory a process needs, in checkpoint sizes (file-backed pages of a mapped checkpoint
# are shared and reclaimable): the guard that skips a case the machine cannot hold now.
NEED = {
    ("evaluate", "after"): 0.2,
    ("init_from", "after"): 1.1,
    ("resume", "after"): 1.1,
    ("evaluate", "before"): 2.1,
    ("init_from", "before"): 2.1,
    ("resume", "before"): 2.1,
}


def write_checkpoint(path: Path, cfg_overrides: dict) -> tuple[int, dict]:
    """A Composer-format checkpoint of the preset with random weights (fp32, model state only).

    The state is built once in memory (one copy, 6.5 GB at the full preset) and saved; torch's
    zip writer streams each tensor to the file without a second copy.
    """
    import torch

    from common.config import to_dict
    from handover.record import RECORD
    from models.config import preset
    from models.mamba_lm import MambaLMHeadModel

    cfg = preset("1.6b", **cfg_overrides)
    if path.exists():
        return path.stat().st_size, to_dict(cfg)
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
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    del state, model_state
    return path.stat().st_size, to_dict(cfg)


def run_case(code_root: Path, case: str, path: Path, cfg: dict, ranks: int, fsdp: bool) -> list[dict]:
    """``ranks`` processes of ``case``: ranks of one FSDP2 run (``fsdp``), or independent processes."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1"}
    script = path.parent.parent / "bench_child.py"
    script.write_text(CHILD)
    args = [str(script), case, str(path), json.dumps(cfg), "1" if fsdp else "0"]
    if fsdp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--master-port={free_port()}",
        ]
        procs = [subprocess.Popen([*cmd, *args], cwd=code_root, env=env, stdout=subprocess.PIPE, text=True)]
    else:
        procs = [
            subprocess.Popen(
                [sys.executable, *args], cwd=code_root, env=env, stdout=subprocess.PIPE, text=True
            )
            for _ in range(ranks)
        ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{case} ({code_root}) failed with exit code {proc.returncode}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith('{"peak"')]
    assert len(results) == ranks, results
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="folder for the checkpoints")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (and reuse them next time)")
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
    sharded = Path(args.dir) / "checkpoints" / "ep0-ba100"
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    size, cfg = write_checkpoint(path, overrides)
    if not (path.parent / "latest-rank0.pt").exists():
        (path.parent / "latest-rank0.pt").symlink_to(path.name)
    ranks_list = [int(r) for r in args.ranks.split(",")]
    if any(r > 1 for r in ranks_list) and not (sharded / ".metadata").exists():
        write_sharded(sharded, cfg)
    print(
        f"checkpoint: 1.6b preset{f' truncated to {args.n_layer} blocks' if args.n_layer else ''}, "
        f"{size / 2**30:.2f} GiB, written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    codes = [("after", ROOT)] + ([("before", Path(args.before))] if args.before else [])
    rows = []
    try:
        for case in args.cases.split(","):
            for ranks in ranks_list:
                # Two ranks: of one FSDP2 run for init_from (from either checkpoint) and resume (from
                # the sharded one, as an FSDP run resumes); evaluation runs in one process per model,
                # so two evaluations at once.
                fsdp = ranks > 1 and case != "evaluate"
                sources = [("monolithic", path)]
                if fsdp:
                    sources = [("sharded", sharded)] if case == "resume" else [*sources, ("sharded", sharded)]
                for source, where in sources:
                    for label, root in codes:
                        need = NEED[(case, label)] * size * (0.55 if fsdp and label == "after" else 1) * ranks
                        free = mem_available()
                        if need + 2**30 > free:
                            rows.append((case, ranks, source, label, None, need, free, None))
                            print(f"  {case} x{ranks} {source} {label}: skipped", flush=True)
                            continue
                        res = run_case(root, case, where, cfg, ranks, fsdp)
                        peak = max(r["peak"] for r in res)
                        base, wall = max(r["base"] for r in res), max(r["wall"] for r in res)
                        rows.append((case, ranks, source, label, peak, base, free, wall))
                        print(f"  {case} x{ranks} {source} {label}: peak {peak / 2**30:.2f} GiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(path.parent)
    print("\n| case | ranks | source | code | peak RSS / process (GiB) | x ckpt | base (GiB) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for case, ranks, source, label, peak, base, free, wall in rows:
        if peak is None:
            print(
                f"| {case} | {ranks} | {source} | {label} | not run: needs ~{base / 2**30:.0f} GiB, "
                f"{free / 2**30:.0f} GiB available | | | |"
            )
            continue
        print(
            f"| {case} | {ranks} | {source} | {label} | {peak / 2**30:.2f} | {peak / size:.2f} | "
            f"{base / 2**30:.2f} | {wall:.1f} |"
        )
    print(f"\ncheckpoint {size / 2**30:.2f} GiB; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
