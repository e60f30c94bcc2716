"""Reliability: whole-or-absent checkpoints, recovery from broken ones, NaN guard, the lr after a load,
and a run that checks everything before it writes anything."""

from __future__ import annotations

import copy
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from composer import Algorithm, Callback, Event, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from torch.utils.data import DataLoader, Dataset

from callbacks.jsonl_logger import read_jsonl
from callbacks.loss_spike import LossSpikeRollback
from callbacks.nonfinite_guard import NonFiniteError, NonFiniteGuard
from callbacks.schedulers import WarmupStableDecayScheduler
from common.config import ConfigError
from handover.integrity import (
    QUARANTINE,
    checkpoint_problem,
    install_atomic_checkpoint_writes,
    recover_checkpoint_folder,
)
from models.composer_model import ComposerMambaLM
from models.config import preset
from recipes.config import load_train_config
from recipes.train import build_trainer, is_complete, prepare_run
from tests.conftest import StopAfter, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
WSD = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]


# ----------------------------------------------------------------------------------------------
# Whole or absent


def save(path: Path, value: float = 1.0) -> Path:
    torch.save({"state": {"model": {"w": torch.full((64, 64), value)}}}, path)
    return path


def test_an_interrupted_monolithic_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_die(state_dict: dict, filename: str) -> None:
        with open(filename, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a kill looks like from inside (no cleanup past this point)

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", half_then_die)
    install_atomic_checkpoint_writes()
    target = tmp_path / "ep0-ba4-rank0.pt"
    with pytest.raises(KeyboardInterrupt):
        composer_checkpoint._write_checkpoint_file({}, str(target))
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary one


def test_a_written_checkpoint_appears_whole_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        composer_checkpoint, "_write_checkpoint_file", composer_checkpoint._write_checkpoint_file
    )
    install_atomic_checkpoint_writes()
    install_atomic_checkpoint_writes()  # idempotent: wrapped once
    target = tmp_path / "ep0-ba4-rank0.pt"
    composer_checkpoint._write_checkpoint_file({"x": torch.arange(5)}, str(target))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert torch.equal(torch.load(target)["x"], torch.arange(5))


@pytest.mark.parametrize(
    ("breaker", "reason"),
    [
        (lambda p: os.truncate(p, p.stat().st_size // 2), "truncated"),
        (lambda p: os.truncate(p, 0), "empty"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "truncated or not a checkpoint"),
    ],
)
def test_a_broken_monolithic_checkpoint_is_named(tmp_path: Path, breaker, reason: str) -> None:
    path = save(tmp_path / "ep0-ba2-rank0.pt")
    assert checkpoint_problem(path) is None
    breaker(path)
    assert reason in checkpoint_problem(path)


def test_a_flipped_byte_fails_the_crc(tmp_path: Path) -> None:
    path = save(tmp_path / "ep0-ba2-rank0.pt", value=3.0)
    with zipfile.ZipFile(path) as archive:  # the tensor's bytes, found through the zip directory
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    with path.open("r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    assert "fails its CRC-32 check" in checkpoint_problem(path)


def test_a_sharded_checkpoint_is_whole_only_with_its_metadata_and_every_byte(tmp_path: Path) -> None:
    folder = tmp_path / "ep0-ba2"
    dcp.save({"w": torch.ones(256, 256)}, checkpoint_id=str(folder), no_dist=True)
    assert checkpoint_problem(folder) is None
    shard = next(folder.glob("*.distcp"))
    os.truncate(shard, shard.stat().st_size - 10)
    assert "truncated" in checkpoint_problem(folder)
    (folder / ".metadata").unlink()
    assert "has no .metadata" in checkpoint_problem(folder)


def test_recovery_sets_broken_ones_aside_and_points_latest_at_the_newest_good(tmp_path: Path) -> None:
    good, newer, newest = (save(tmp_path / f"ep0-ba{b}-rank0.pt", b) for b in (2, 4, 6))
    os.truncate(newest, 10)  # killed while writing (in place, as Composer does without the wrapper)
    (tmp_path / ".tmp-123-ep0-ba8-rank0.pt").write_bytes(b"partial")
    os.symlink(good.name, tmp_path / "latest-rank0.pt")  # a kill between a rename and the link update
    recovery = recover_checkpoint_folder(tmp_path)
    assert recovery.latest == str(newer)
    assert [q[0] for q in recovery.quarantined] == [str(newest)]
    assert os.readlink(tmp_path / "latest-rank0.pt") == newer.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        good.name,
        newer.name,
        "latest-rank0.pt",
        QUARANTINE,
    ]
    (kept,) = (tmp_path / QUARANTINE).iterdir()
    assert kept.name.startswith(newest.name)  # nothing deleted: moved aside, named
    os.truncate(newer, 0)
    os.truncate(good, 0)
    assert recover_checkpoint_folder(tmp_path).latest is None  # nothing good: no latest, a fresh start
    assert not (tmp_path / "latest-rank0.pt").exists()


def test_a_run_resumes_past_a_broken_newest_checkpoint(corpus: dict[str, Path], tmp_path: Path) -> None:
    """Same weights as an uninterrupted run: the broken ba6 is set aside, the run resumes from ba4."""

    def run(root: Path, stop: int | None = None) -> dict[str, torch.Tensor]:
        cfg = load_train_config(
            [ROOT / "yamls/tiny/wsd.yaml"], [*tiny_overrides(corpus, root, eval_interval="null"), *WSD]
        )
        trainer = build_trainer(prepare_run(cfg), extra_callbacks=[StopAfter(stop)] if stop else None)
        trainer.fit()
        weights = copy.deepcopy(trainer.state.model.model.state_dict())
        trainer.close()
        return weights

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=6)
    ckpt = tmp_path / "b" / "tiny-wsd" / "checkpoints" / "ep0-ba6-rank0.pt"
    os.truncate(ckpt, ckpt.stat().st_size // 2)
    resumed = run(tmp_path / "b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert list((ckpt.parent / QUARANTINE).glob("ep0-ba6-rank0.pt.*"))


# ----------------------------------------------------------------------------------------------
# Non-finite losses and gradients


class Tokens(Dataset):
    def __init__(self) -> None:
        self.tokens = torch.randint(0, 512, (64, 17), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class Poison(Algorithm):
    """Makes batch ``batch``'s loss NaN (``what='loss'``) or one gradient inf (``what='grad'``)."""

    def __init__(self, batch: int, what: str) -> None:
        self.batch, self.what = batch, what

    def match(self, event: Event, state: State) -> bool:
        wanted = Event.AFTER_LOSS if self.what == "loss" else Event.AFTER_BACKWARD
        return event == wanted and int(state.timestamp.batch) == self.batch

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if self.what == "loss":
            state.loss = state.loss * float("nan")
        else:
            next(state.model.parameters()).grad[0, 0] = float("inf")


class Weights(Callback):
    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.at[int(state.timestamp.batch)] = copy.deepcopy(state.model.state_dict())


def poisoned_trainer(tmp_path: Path, poison: Poison, *callbacks: Callback, **trainer_args: Any) -> Trainer:
    """The debug model for 8 batches under the NonFiniteGuard, ``poison`` armed; ``trainer_args``
    (a device, a micro-batch size) override the Trainer's."""
    torch.manual_seed(0)
    model = ComposerMambaLM(preset("debug"))
    settings: dict[str, Any] = {
        "model": model,
        "train_dataloader": DataLoader(Tokens(), batch_size=4),
        "optimizers": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "schedulers": WarmupStableDecayScheduler("0ba", 0.5),
        "max_duration": "8ba",
        "algorithms": [poison],
        "callbacks": [NonFiniteGuard(), *callbacks],
        "save_folder": str(tmp_path),
        "save_interval": "2ba",
        "device": "cpu",
        "progress_bar": False,
        "log_to_console": False,
    }
    return Trainer(**{**settings, **trainer_args})


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_nan_stops_the_run_before_the_step_and_before_any_checkpoint(tmp_path: Path, what: str) -> None:
    weights = Weights()
    trainer = poisoned_trainer(tmp_path, Poison(3, what), weights)
    with pytest.raises(
        NonFiniteError, match=r"not finite at batch 3.*optimizer did not step.*callbacks.loss_spike"
    ) as info:
        trainer.fit()
    if what == "grad":
        assert "gradients of model.backbone.embedding.weight" in str(info.value)
    after = trainer.state.model.state_dict()
    assert all(torch.equal(after[k], weights.at[3][k]) for k in after)  # batch 3 changed nothing
    assert sorted(p.name for p in tmp_path.glob("ep*")) == ["ep0-ba2-rank0.pt"]  # ba4 was never written


def test_with_rollback_a_nan_batch_is_rolled_back_and_no_weight_goes_non_finite(tmp_path: Path) -> None:
    weights = Weights()
    rollback = LossSpikeRollback(window=4, warmup_batches=2)
    trainer = poisoned_trainer(tmp_path, Poison(5, "grad"), rollback, weights)
    trainer.fit()
    assert rollback.rollbacks == 1
    assert all(torch.isfinite(t).all() for state in weights.at.values() for t in state.values())
    assert int(trainer.state.timestamp.batch) == 8


# ----------------------------------------------------------------------------------------------
# The run checks everything first


def test_a_bad_config_writes_nothing_and_lists_every_problem(corpus: dict[str, Path], tmp_path: Path) -> None:
    overrides = tiny_overrides(corpus, tmp_path, **{"model.vocab_size": 100, "scheduler.t_warmup": "20ba"})
    cfg = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], overrides)
    with pytest.raises(ConfigError) as info:
        build_trainer(prepare_run(cfg))
    text = str(info.value)
    assert "model.vocab_size=100 is smaller than the tokenizer's 300 tokens" in text
    assert "t_warmup (20ba) + t_decay" in text and "exceed t_max (8ba)" in text
    assert not cfg.run_dir.exists()


def test_a_checkpoint_of_another_shape_is_refused_naming_the_parameter(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    base = [*tiny_overrides(corpus, tmp_path, eval_interval="null"), *WSD]
    cfg = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], base)
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=[StopAfter(2)])
    trainer.fit()
    trainer.close()
    before = (cfg.run_dir / "run.json").read_text()
    wider = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], [*base, "model.d_model=48"])
    with pytest.raises(
        ConfigError, match=r"backbone.embedding.weight is \(304, 32\) in the checkpoint but \(304, 48\)"
    ):
        build_trainer(prepare_run(wider))
    assert (cfg.run_dir / "run.json").read_text() == before


def test_a_finished_run_is_complete_and_a_longer_one_continues(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    base = [*tiny_overrides(corpus, tmp_path, eval_interval="null"), *WSD]
    cfg = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], base)
    trainer = build_trainer(prepare_run(cfg))
    trainer.fit()
    trainer.close()
    again = build_trainer(prepare_run(cfg))
    assert is_complete(again)
    again.close()
    longer = build_trainer(
        prepare_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], [*base, "max_duration=10ba"]))
    )
    assert not is_complete(longer) and int(longer.state.timestamp.batch) == 8
    longer.close()


def test_a_decay_with_a_new_peak_starts_at_it(corpus: dict[str, Path], tmp_path: Path) -> None:
    base = [*tiny_overrides(corpus, tmp_path, eval_interval="null", run_name="stable"), *WSD]
    stable = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], base)
    trainer = build_trainer(prepare_run(stable))
    trainer.fit()
    trainer.close()
    pre_decay = stable.run_dir / "checkpoints" / "pre-decay" / "pre-decay-ba6.pt"
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        eval_interval="null",
        run_name="decay",
        max_duration="4ba",
        **{"checkpoint.load_path": pre_decay, "optimizer.lr": 2 * stable.optimizer.lr},
    )
    cfg = load_train_config([ROOT / "yamls/tiny/decay.yaml"], overrides)
    trainer = build_trainer(prepare_run(cfg))
    seen = []

    class FirstLr(Callback):
        def batch_start(self, state: State, logger: Logger) -> None:
            seen.append(state.optimizers[0].param_groups[0]["lr"])

    trainer.state.callbacks.append(FirstLr())
    trainer.fit()
    trainer.close()
    assert seen[0] == pytest.approx(2 * stable.optimizer.lr)  # the new peak from the first batch, no jump
    lrs = [r["lr-AdamW/group0"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "lr-AdamW/group0" in r]
    assert lrs[0] == pytest.approx(2 * stable.optimizer.lr)
