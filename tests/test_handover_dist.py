"""Sharded (DCP) checkpoints of ``composer -n 2`` runs read in one process, and init_from under
``composer -n 2``: every rank loading (CPU), and rank 0 loading into a meta-device model (the
GPU FSDP path) with Composer broadcasting its weights."""

from __future__ import annotations

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


def launch(script: Path, overrides: list[str]) -> None:
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
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


def test_sharded_checkpoint_is_read_in_one_process(corpus: dict[str, Path], tmp_path: Path) -> None:
    train_sharded_and_full(corpus, tmp_path)
    sharded = read_weights(tmp_path / "sharded")  # the run folder: its latest (sharded) checkpoint
    assert sharded.format == "composer-sharded" and sharded.config.d_model == 32
    reference = full_weights(tmp_path / "full" / "checkpoints" / "ep0-ba4-rank0.pt")
    assert sharded.state_dict.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(sharded.state_dict[key], value), key


def test_init_from_under_two_processes(corpus: dict[str, Path], tmp_path: Path) -> None:
    """An HF checkpoint as init_from of a 2-process FSDP2 run, loaded by every rank (CPU), and by rank 0
    alone into a meta-device model (the GPU path). At a negligible lr one step barely moves the
    weights, so the first saved checkpoint must still equal the source (a fresh init would not)."""
    from handover.hf_mamba import export_hf
    from models.config import MambaConfig, SSMConfig
    from models.mamba_lm import MambaLMHeadModel

    source = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=300, ssm=SSMConfig(d_state=8)))
    export_hf(source, tmp_path / "released")
    start = {
        "eval_interval": "null",
        "max_duration": "1ba",
        "checkpoint.save_interval": "1ba",
        "fsdp.state_dict_type": "full",
        "optimizer.lr": 1e-12,
        "scheduler.t_warmup": "0ba",
        "scheduler.t_decay": "1ba",
        "init_from.path": tmp_path / "released",
    }
    launch(ROOT / "recipes" / "train.py", tiny_overrides(corpus, tmp_path, run_name="every-rank", **start))
    launch(ROOT / "tests/dist/train_on_meta.py", tiny_overrides(corpus, tmp_path, run_name="meta", **start))
    for run in ("every-rank", "meta"):
        started = full_weights(tmp_path / run / "checkpoints" / "ep0-ba1-rank0.pt")
        for key, value in source.state_dict().items():
            torch.testing.assert_close(started[key], value, rtol=0, atol=1e-8, msg=f"{run}: {key}")
