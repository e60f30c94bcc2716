"""recipes/train.py end to end on a tiny corpus: every recipe builds, resume is exact, decay phases,
and the composer launcher with FSDP2 across world sizes."""

from __future__ import annotations

import glob
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.mamba_lm import MambaLMHeadModel
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.conftest import StopAfter, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(glob.glob(str(ROOT / "yamls" / "**" / "*.yaml"), recursive=True))
TRAIN_RECIPES = [r for r in RECIPES if "/yamls/data/" not in r]


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: str(Path(p).relative_to(ROOT / "yamls")))
def test_every_recipe_loads_and_builds(recipe: str) -> None:
    cfg = load_train_config([recipe])
    with torch.device("meta"):
        model = MambaLMHeadModel(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert cfg.global_train_batch_size % cfg.device_train_microbatch_size == 0
    # The recipe's data mixture exists (paths are relative to the repository root) and has its phase.
    from data.mixture import load_mixture

    mixture = load_mixture(ROOT / cfg.data.mixture)
    assert cfg.data.phase in mixture.phases


WSD = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]  # the tiny recipes' WSD, shortened to 8 batches


def train(overrides: list[str], recipe: str = "yamls/tiny/wsd_posweight.yaml", stop: int | None = None):
    cfg = load_train_config([ROOT / recipe], overrides)
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=[StopAfter(stop)] if stop else None)
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    batch = int(trainer.state.timestamp.batch)
    trainer.close()
    return weights, batch, cfg


@pytest.mark.parametrize("stop", [4, 7])
def test_resume_is_exact(corpus: dict[str, Path], tmp_path: Path, stop: int) -> None:
    """Stopped in the stable phase (4) or inside the decay (7, where every batch has its own lr)."""
    straight, steps, _ = train([*tiny_overrides(corpus, tmp_path / "a"), *WSD])
    assert steps == 8
    # Same run, stopped after `stop` batches (the schedule still spans 8), then autoresumed.
    overrides = [*tiny_overrides(corpus, tmp_path / "b", **{"checkpoint.save_interval": "1ba"}), *WSD]
    _, stopped_at, _ = train(overrides, stop=stop)
    assert stopped_at == stop
    resumed, steps, cfg = train(overrides)
    assert steps == 8
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    assert (cfg.run_dir / "metrics.jsonl").is_file() and (cfg.run_dir / "run.json").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, overrides: list[str]) -> subprocess.CompletedProcess:
    script = str(ROOT / "recipes" / "train.py")
    recipe = str(ROOT / "yamls" / "tiny" / "wsd.yaml")
    if nproc == 1:
        cmd = [sys.executable, script, recipe, *overrides]
    else:
        launcher = str(Path(sys.executable).parent / "composer")
        cmd = [launcher, "-n", str(nproc), "--master_port", str(free_port()), script, recipe, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def last_batch(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    return int(ckpt["state"]["timestamp"]["Timestamp"]["batch"])


@pytest.mark.dist
def test_fsdp2_train_and_resume_across_world_sizes(corpus: dict[str, Path], tmp_path: Path) -> None:
    """One run resumed across world sizes: 1 process for 4 batches, 2 processes to batch 6 (a 1-process
    checkpoint resumed by 2), then 1 process to batch 8 (a 2-process checkpoint resumed by 1)."""
    overrides = tiny_overrides(
        corpus, tmp_path, **{"fsdp.state_dict_type": "full", "eval_interval": "null", "run_name": "x"}
    )
    overrides += WSD
    for nproc, batches in ((1, 4), (2, 6), (1, 8)):
        launch(nproc, [*overrides, f"max_duration={batches}ba"])
        assert last_batch(tmp_path / "x") == batches, nproc
    from callbacks.jsonl_logger import read_jsonl

    records = [r for r in read_jsonl(tmp_path / "x" / "metrics.jsonl") if "loss/train/total" in r]
    assert [r["step"] for r in records] == list(range(8))  # 4 batches, then 2 and 2 more, once each
    assert all(
        isinstance(r["loss/train/total"], float) and math.isfinite(r["loss/train/total"]) for r in records
    )


@pytest.mark.slow  # two training runs and a handover
def test_decay_phase_from_pre_decay_checkpoint(corpus: dict[str, Path], tmp_path: Path) -> None:
    from callbacks.jsonl_logger import read_jsonl

    # Stable run: WSD over 8 batches, decay 0.25 -> the stable phase ends after batch 6.
    _, _, stable_cfg = train(
        [*tiny_overrides(corpus, tmp_path, run_name="stable"), *WSD], recipe="yamls/tiny/wsd.yaml"
    )
    pre_decay = stable_cfg.run_dir / "checkpoints" / "pre-decay" / "pre-decay-ba6.pt"
    assert pre_decay.is_file()
    saved = torch.load(pre_decay, map_location="cpu", weights_only=False)["state"]
    assert saved["timestamp"]["Timestamp"]["batch"] == 6

    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="decay",
        max_duration="4ba",
        eval_interval="null",
        **{"checkpoint.load_path": pre_decay},
    )
    cfg = load_train_config([ROOT / "yamls/tiny/decay.yaml"], overrides)
    trainer = build_trainer(prepare_run(cfg))
    # The optimizer state is the checkpoint's (AdamW moments of every parameter).
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ours = get_optimizer_state_dict(trainer.state.model, trainer.state.optimizers[0])["state"]
    theirs = next(iter(saved["optimizers"].values()))["state"]  # keyed by parameter name
    assert len(ours) == len(theirs) > 0
    for key in ours:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours[key][name], theirs[key][name])
    # The new mix: the decay phase reads the chat stream beside the pre-training one.
    assert len(trainer.state.train_dataloader.dataset.streams) == 2
    assert int(trainer.state.timestamp.batch) == 0  # a fresh clock: the old data position is not used
    trainer.fit()
    trainer.close()
    lrs = [r["lr-AdamW/group0"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "lr-AdamW/group0" in r]
    peak = cfg.optimizer.lr
    # decay_phase from t_start=0 over 4 batches, linear to alpha_f=0.1: f(n) = 1 - 0.9 n / 4.
    # LRMonitor logs at the end of batch n the lr after the scheduler step, f(n); batch 0 trains at
    # f(0) = 1: the stable lr of the pre-decay checkpoint, no jump at the boundary.
    assert lrs == pytest.approx([peak * (1 - 0.9 * n / 4) for n in range(4)], rel=1e-6)


def test_state_reset_option_is_checked_against_the_mixer() -> None:
    with pytest.raises(ValueError, match="needs Mamba-2 layers"):
        load_train_config([ROOT / "yamls/tiny/wsd.yaml"], ["reset_state_at_doc_boundaries=true"])
    cfg = load_train_config([ROOT / "yamls/tiny/mamba2.yaml"], ["reset_state_at_doc_boundaries=true"])
    assert cfg.reset_state_at_doc_boundaries


def test_remote_poll_seconds_reaches_every_checkpoint_saver(corpus: dict[str, Path], tmp_path: Path) -> None:
    """checkpoint.remote_poll_seconds is the interval of both savers (the Trainer's own and the
    pre-decay one), and Composer's saver passes exactly that attribute as the wait between checks
    for a checkpoint's objects before the `latest` link: a renamed attribute in another Composer
    would leave the 30 s default in place, silently."""
    import inspect

    from composer.callbacks import CheckpointSaver

    from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
    from recipes.train import REMOTE_POLL_ATTRIBUTE

    cfg = load_train_config(
        [ROOT / "yamls/tiny/wsd.yaml"],
        [*tiny_overrides(corpus, tmp_path), *WSD, "checkpoint.remote_poll_seconds=2.5"],
    )
    trainer = build_trainer(prepare_run(cfg))
    savers = [cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)]
    savers += [cb.saver for cb in trainer.state.callbacks if isinstance(cb, PreDecayCheckpoint)]
    trainer.close()
    assert len(savers) == 2
    assert [getattr(s, REMOTE_POLL_ATTRIBUTE) for s in savers] == [2.5, 2.5]
    source = inspect.getsource(CheckpointSaver._save_checkpoint)
    assert f"wait_before_next_try_in_seconds=self.{REMOTE_POLL_ATTRIBUTE}" in source


@pytest.mark.parametrize("seconds", [0, -1])
def test_remote_poll_seconds_must_be_positive(corpus: dict[str, Path], tmp_path: Path, seconds: int) -> None:
    from common.config import ConfigError

    cfg = load_train_config(
        [ROOT / "yamls/tiny/wsd.yaml"],
        [*tiny_overrides(corpus, tmp_path), *WSD, f"checkpoint.remote_poll_seconds={seconds}"],
    )
    with pytest.raises(ConfigError, match=r"checkpoint.remote_poll_seconds=.*give a positive number"):
        prepare_run(cfg)
