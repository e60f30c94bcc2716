"""Sharded (DCP) checkpoints of ``composer -n 2`` runs read in one process, and init_from under
``composer -n 2`` FSDP2: each rank reads only its own shards of the source, into a model built on
the CPU or on the meta device (the GPU FSDP path)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handover.weights import read_weights
from tests.conftest import tiny_overrides
from tests.test_train import ROOT, free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def launch(script: Path, overrides: list[str], **env_extra: str) -> None:
    launcher = str(Path(sys.executable).parent / "composer")
    cmd = [
        launcher,
        "-n",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(ROOT / "yamls/tiny/wsd.yaml"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def train_sharded_and_full(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The same 2-process run twice, 4 batches: FSDP's sharded (DCP) checkpoint in ``tmp_path/sharded``
    and a full one, the reference, in ``tmp_path/full`` (here and in test_training_state)."""
    train = ROOT / "recipes" / "train.py"
    run = {
        "eval_interval": "null",
        "max_duration": "4ba",
        "checkpoint.save_interval": "4ba",
        "scheduler.t_warmup": "1ba",
        "scheduler.t_decay": "1ba",
    }
    launch(train, tiny_overrides(corpus, tmp_path, run_name="sharded", **run))
    launch(
        train, tiny_overrides(corpus, tmp_path, run_name="full", **{**run, "fsdp.state_dict_type": "full"})
    )
    assert (tmp_path / "sharded" / "checkpoints" / "ep0-ba4" / ".metadata").is_file()


def test_sharded_checkpoint_is_read_in_one_process(sharded_and_full: Path) -> None:
    sharded = read_weights(sharded_and_full / "sharded")  # the run folder: its latest (sharded) checkpoint
    assert sharded.format == "composer-sharded" and sharded.config.d_model == 32
    reference = full_weights(sharded_and_full / "full" / "checkpoints" / "ep0-ba4-rank0.pt")
    assert sharded.state_dict.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(sharded.state_dict[key], value), key


def shard_bytes(shapes: list[torch.Size], element_size: int, rank: int, world: int = 2) -> int:
    """Bytes of rank ``rank``'s rows of each tensor under FSDP2 (rows split in ``ceil(rows / world)`` chunks)."""
    total = 0
    for shape in shapes:
        chunk = -(-shape[0] // world)
        rows = max(0, min(shape[0], (rank + 1) * chunk) - rank * chunk)
        total += rows * math.prod(shape[1:]) * element_size
    return total


def counts(folder: Path, rank: int) -> dict[str, dict[str, int]]:
    return json.loads((folder / f"rank{rank}.json").read_text())


COUNTING = ROOT / "tests/dist/train_counting_reads.py"
START = {  # one step at a negligible lr: the first checkpoint must still equal the source
    "eval_interval": "null",
    "max_duration": "1ba",
    "checkpoint.save_interval": "1ba",
    "fsdp.state_dict_type": "full",
    "optimizer.lr": 1e-12,
    "scheduler.t_warmup": "0ba",
    "scheduler.t_decay": "1ba",
}


def test_init_from_under_two_processes(corpus: dict[str, Path], tmp_path: Path) -> None:
    """An HF checkpoint (safetensors, memory-mapped) as init_from of a 2-process FSDP2 run, into a
    model built on the CPU and into one built on the meta device (the GPU path): the weights are
    the source's, and each rank copied exactly its own rows (half the model), never all of it."""
    from handover.hf_mamba import export_hf
    from models.config import MambaConfig, SSMConfig
    from models.mamba_lm import MambaLMHeadModel

    source = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=300, ssm=SSMConfig(d_state=8)))
    export_hf(source, tmp_path / "released")
    shapes = [p.shape for p in source.parameters()]
    start = {**START, "init_from.path": tmp_path / "released"}
    for run, meta in (("every-rank", "0"), ("meta", "1")):
        out = tmp_path / f"{run}-reads"
        out.mkdir()
        launch(
            COUNTING,
            tiny_overrides(corpus, tmp_path, run_name=run, **start),
            READS_OUT=str(out),
            ON_META=meta,
        )
        started = full_weights(tmp_path / run / "checkpoints" / "ep0-ba1-rank0.pt")
        for key, value in source.state_dict().items():
            torch.testing.assert_close(started[key], value, rtol=0, atol=1e-8, msg=f"{run}: {key}")
        per_rank = [sum(counts(out, rank)["materialised"].values()) for rank in (0, 1)]
        assert per_rank == [shard_bytes(shapes, 4, 0), shard_bytes(shapes, 4, 1)], run
        assert sum(per_rank) == sum(4 * math.prod(s) for s in shapes)  # together: the model, once


def test_init_from_a_sharded_checkpoint_reads_each_ranks_shards(
    corpus: dict[str, Path], sharded_and_full: Path, tmp_path: Path
) -> None:
    """A 2-process run's sharded (DCP) checkpoint as init_from of another 2-process FSDP2 run on the meta
    device: each rank reads its own rows through torch.distributed.checkpoint, and the started
    model equals the checkpoint as read whole in one process."""
    folder = sharded_and_full / "sharded" / "checkpoints" / "ep0-ba4"
    reference = read_weights(folder)
    assert reference.format == "composer-sharded"
    out = tmp_path / "reads"
    out.mkdir()
    start = {**START, "init_from.path": folder}
    launch(
        COUNTING, tiny_overrides(corpus, tmp_path, run_name="dst", **start), READS_OUT=str(out), ON_META="1"
    )
    started = full_weights(tmp_path / "dst" / "checkpoints" / "ep0-ba1-rank0.pt")
    for key, value in reference.state_dict.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=1e-8, msg=key)
    shapes = [
        v.shape
        for k, v in reference.state_dict.items()
        if k != "lm_head.weight" or not reference.config.tie_embeddings
    ]
    for rank in (0, 1):
        assert sum(counts(out, rank)["materialised"].values()) == shard_bytes(shapes, 4, rank), rank
