"""recipes/train.py that records, per rank, what it read of its init_from checkpoint.

Run by tests/test_handover_dist.py as ``composer -n 2 tests/dist/train_counting_reads.py RECIPE
key=value ...`` with ``READS_OUT`` set to a folder: at exit each rank writes
``READS_OUT/rank{r}.json`` with ``handover.reader``'s counters (bytes copied into its
shards, full reads of each file). ``ON_META=1`` builds the model on the meta device on every
rank, as under FSDP on GPUs; Composer 0.32.1 then materialises each shard with
``to_empty(device='cuda')`` (composer/distributed/param_init.py), which this script points at
the CPU: the same steps, on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import recipes.train as train
from handover import reader as checkpoint_reader
from tests.dist.train_on_meta import build_on_meta


def write_counts() -> None:
    rank = int(os.environ["RANK"])
    counts = {
        "materialised": dict(checkpoint_reader.MATERIALISED),
        "reads": dict(checkpoint_reader.READS),
    }
    (Path(os.environ["READS_OUT"]) / f"rank{rank}.json").write_text(json.dumps(counts))


def meta_init_on_cpu(module: torch.nn.Module, param_init_fn=None) -> None:
    """Composer's ``meta_init`` with the CPU in place of CUDA: each module's own meta tensors
    (its shards, DTensors) are materialised, then initialised by the model's ``param_init_fn``."""
    init_fn = getattr(module, "param_init_fn", param_init_fn)
    for child in module.children():
        meta_init_on_cpu(child, init_fn)
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if any(t.is_meta for t in tensors):
        module.to_empty(device="cpu", recurse=False)
        init_fn(module)


if __name__ == "__main__":
    if os.environ.get("ON_META") == "1":
        import composer.distributed.prepare_distributed as prepare

        train.build_model = build_on_meta
        prepare.meta_init = meta_init_on_cpu
    try:
        train.main(sys.argv[1:])
    finally:
        write_counts()
