"""PreDecayCheckpoint in a real Composer Trainer: once, at the right batch, resumable, loadable."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer import Algorithm, Callback, Event, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, Dataset

from callbacks.gloo_grad_average import GlooFSDP2GradAverage
from callbacks.loss_spike import LossSpikeRollback
from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
from callbacks.schedulers import DecayPhaseScheduler, WarmupStableDecayScheduler
from models.composer_model import ComposerMambaLM
from models.config import preset

ROOT = Path(__file__).resolve().parents[1]
PEAK_LR = 1e-3
SEQ = 16


class RandomTokens(Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.tokens = torch.randint(0, 512, (n, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class SnapshotAt(Callback):
    """Copies the weights at one batch boundary: the reference the checkpoint must equal."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.weights: dict[str, torch.Tensor] | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            self.weights = copy.deepcopy(state.model.state_dict())


def make_trainer(
    save_folder: Path, pre_decay_folder: Path, callbacks: list | None = None, **kwargs
) -> Trainer:
    torch.manual_seed(0)
    model = ComposerMambaLM(preset("debug"))
    scheduler = kwargs.pop("schedulers", WarmupStableDecayScheduler("2ba", 0.25, "linear", alpha_f=0.0))
    pre_decay = (
        [PreDecayCheckpoint(scheduler, str(pre_decay_folder))]
        if isinstance(scheduler, WarmupStableDecayScheduler)
        else []
    )
    return Trainer(
        model=model,
        train_dataloader=DataLoader(RandomTokens(), batch_size=2, shuffle=False),
        optimizers=torch.optim.AdamW(model.parameters(), lr=PEAK_LR),
        schedulers=scheduler,
        max_duration=kwargs.pop("max_duration", "20ba"),
        callbacks=[*pre_decay, *(callbacks or [])],
        save_folder=str(save_folder),
        save_interval=kwargs.pop("save_interval", "4ba"),
        device="cpu",
        precision="fp32",
        progress_bar=False,
        seed=0,
        **kwargs,
    )


def pre_decay_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """20 batches of WSD with a 0.25 decay: the stable phase ends at 15ba."""
    folder = tmp_path_factory.mktemp("run")
    snapshot = SnapshotAt(15)
    trainer = make_trainer(folder, folder / "pre-decay", [snapshot])
    trainer.fit()
    trainer.close()
    assert snapshot.weights is not None
    return folder, snapshot.weights


def test_saved_once_at_the_end_of_the_stable_phase(first_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, weights_at_15 = first_run
    assert pre_decay_files(folder / "pre-decay") == ["pre-decay-ba15.pt"]  # once, nothing else left behind
    ckpt = torch.load(folder / "pre-decay" / "pre-decay-ba15.pt", map_location="cpu", weights_only=False)
    assert int(ckpt["state"]["timestamp"]["Timestamp"]["batch"]) == 15
    for name, tensor in weights_at_15.items():
        assert torch.equal(ckpt["state"]["model"][name], tensor), name
    # Batch 14 was stepped with f(14) = 1 (the stable lr); the decay's first value f(15) = 1 comes later.
    groups = ckpt["state"]["optimizers"]["AdamW"]["param_groups"]
    assert [g["lr"] for g in groups] == [PEAK_LR] * len(groups)
    (scheduler_state,) = ckpt["state"]["schedulers"].values()
    assert scheduler_state["_last_lr"] == [PEAK_LR] * len(groups)
    # The regular checkpoints are untouched: the CheckpointSaver's own files at 4, 8, 12, 16, 20.
    regular = sorted(p.name for p in folder.glob("ep*-ba*-rank0.pt"))
    assert regular == [f"ep0-ba{b}-rank0.pt" for b in (12, 16, 20, 4, 8)]


def test_stable_end_in_tokens_saves_at_the_first_boundary_past_it(tmp_path: Path) -> None:
    """32 tokens a batch; the decay starts at 544 - 54 = 490 tokens, inside batch 15 (480 -> 512)."""
    wsd = WarmupStableDecayScheduler("2ba", "54tok", "linear", alpha_f=0.0)
    trainer = make_trainer(
        tmp_path, tmp_path / "pre", schedulers=wsd, max_duration="544tok", save_interval="100ba"
    )
    trainer.fit()
    trainer.close()
    assert pre_decay_files(tmp_path / "pre") == ["pre-decay-ba16.pt"]
    ckpt = torch.load(tmp_path / "pre" / "pre-decay-ba16.pt", map_location="cpu", weights_only=False)
    assert int(ckpt["state"]["timestamp"]["Timestamp"]["token"]) == 512


def test_resumed_after_the_boundary_does_not_save_again(
    first_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, _ = first_run
    before = (folder / "pre-decay" / "pre-decay-ba15.pt").stat()
    trainer = make_trainer(tmp_path, folder / "pre-decay", load_path=str(folder / "ep0-ba16-rank0.pt"))
    assert int(trainer.state.timestamp.batch) == 16
    trainer.fit()
    trainer.close()
    after = (folder / "pre-decay" / "pre-decay-ba15.pt").stat()
    assert pre_decay_files(folder / "pre-decay") == ["pre-decay-ba15.pt"]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_resumed_before_the_boundary_saves_it(
    first_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, weights_at_15 = first_run
    trainer = make_trainer(tmp_path / "ckpt", tmp_path / "pre", load_path=str(folder / "ep0-ba12-rank0.pt"))
    trainer.fit()
    trainer.close()
    assert pre_decay_files(tmp_path / "pre") == ["pre-decay-ba15.pt"]
    ckpt = torch.load(tmp_path / "pre" / "pre-decay-ba15.pt", map_location="cpu", weights_only=False)
    # Same data order, same seed: the resumed run reaches the same weights at the boundary.
    for name, tensor in weights_at_15.items():
        torch.testing.assert_close(ckpt["state"]["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_decay_phase_starts_from_the_pre_decay_weights_and_optimizer(
    first_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """The decay-phase workflow: weights and AdamW state from the checkpoint, a fresh timestamp and data."""
    folder, _ = first_run
    path = folder / "pre-decay" / "pre-decay-ba15.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    trainer = make_trainer(
        tmp_path,
        tmp_path / "pre",
        load_path=str(path),
        load_ignore_keys=["state/timestamp", "state/dataset_state", "state/schedulers", "state/callbacks"],
        schedulers=DecayPhaseScheduler(t_start="0ba", decay_shape="linear", alpha_f=0.0),
        max_duration="5ba",
    )
    state = trainer.state
    assert int(state.timestamp.batch) == 0
    model_state = state.model.state_dict()
    for name, tensor in ckpt["state"]["model"].items():
        assert torch.equal(model_state[name], tensor), name
    saved_optim = ckpt["state"]["optimizers"]["AdamW"]["state"]
    optimizer = state.optimizers[0]
    names = {p: n for n, p in state.model.named_parameters()}
    assert len(optimizer.state) == len(saved_optim) == len(names)
    for param, slots in optimizer.state.items():
        saved = saved_optim[names[param]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(slots[key], saved[key]), (names[param], key)
        assert float(slots["step"]) == 15.0
    trainer.fit()  # the decay phase trains from there: 5 batches, lr from the peak down
    trainer.close()
    assert pre_decay_files(tmp_path / "pre") == []  # no stable phase in a decay-phase run: nothing to save
    assert int(state.timestamp.batch) == 5
    assert all(float(slots["step"]) == 20.0 for slots in optimizer.state.values())


# ---------------------------------------------------------------------------------------------
# FSDP2 with sharded state dicts, two processes: `composer -n 2 tests/test_pre_decay_checkpoint.py OUT_DIR`


class PoisonLoss(Algorithm):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_LOSS and int(state.timestamp.batch) == self.batch

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        state.loss = state.loss * 1000.0


class FullSnapshots(Callback):
    """Full (unsharded) weights at every batch end, after the rollback callback ran (a collective)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.weights[int(state.timestamp.batch)] = _full_weights(state)


def _full_weights(state: State) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True)
    return {k: v.clone() for k, v in get_model_state_dict(state.model, options=options).items()}


def _fsdp_trainer(state_dict_type: str, **kwargs) -> Trainer:
    world = dist.get_world_size()
    dataset = RandomTokens()
    model = ComposerMambaLM(preset("debug"))
    return Trainer(
        model=model,
        train_dataloader=DataLoader(
            dataset, batch_size=4 // world, sampler=dist.get_sampler(dataset, shuffle=False)
        ),
        optimizers=torch.optim.AdamW(model.parameters(), lr=PEAK_LR),
        schedulers=kwargs.pop("schedulers", WarmupStableDecayScheduler("1ba", 0.25, "linear", alpha_f=0.0)),
        max_duration="8ba",
        device="cpu",
        precision="fp32",
        parallelism_config={"fsdp": {"state_dict_type": state_dict_type}},
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **kwargs,
    )


def _fsdp_main(out_dir: str, state_dict_type: str) -> None:
    """8 batches of WSD (stable ends at 6), checkpoints every 2, a spike planted at batch 6."""
    folder = os.path.join(out_dir, "ckpt")
    snapshots = FullSnapshots()
    rollback = LossSpikeRollback(window=4, warmup_batches=3)
    wsd = WarmupStableDecayScheduler("1ba", 0.25, "linear", alpha_f=0.0)
    trainer = _fsdp_trainer(
        state_dict_type,
        schedulers=wsd,
        algorithms=[GlooFSDP2GradAverage(), PoisonLoss(6)],
        callbacks=[PreDecayCheckpoint(wsd, os.path.join(folder, "pre-decay")), rollback, snapshots],
        save_folder=folder,
        save_interval="2ba",
    )
    trainer.fit()
    trainer.close()
    reloaded = {}
    sharded = state_dict_type == "sharded"
    paths = {"pre-decay": "pre-decay/ep0-ba6" if sharded else "pre-decay/pre-decay-ba6.pt"}
    paths["restored"] = "ep0-ba4" if sharded else "ep0-ba4-rank0.pt"
    for key, name in paths.items():
        other = _fsdp_trainer(state_dict_type, load_path=os.path.join(folder, name))
        reloaded[key] = (int(other.state.timestamp.batch), _full_weights(other.state))
        other.close()
    if dist.get_global_rank() == 0:
        torch.save({"snapshots": snapshots.weights, "reloaded": reloaded}, os.path.join(out_dir, "result.pt"))


@pytest.mark.dist
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp2_pre_decay_and_rollback(tmp_path: Path, state_dict_type: str) -> None:
    composer = Path(sys.executable).parent / "composer"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FSDP_VERSION": "2", "PYTHONPATH": str(ROOT)}
    script = str(Path(__file__).resolve())
    cmd = [str(composer), "-n", "2", "--master_port", str(port), script, str(tmp_path), state_dict_type]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "ckpt"
    if state_dict_type == "sharded":
        # A sharded checkpoint is a directory: one file per rank plus the metadata; nothing else left.
        assert pre_decay_files(folder / "pre-decay") == ["ep0-ba6"]
        shards = sorted(p.name for p in (folder / "pre-decay" / "ep0-ba6").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        restored = folder / "ep0-ba4"
    else:
        assert pre_decay_files(folder / "pre-decay") == [
            "pre-decay-ba6.pt"
        ]  # rank 0 wrote the gathered state
        restored = folder / "ep0-ba4-rank0.pt"
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    snapshots, reloaded = result["snapshots"], result["reloaded"]
    batch, weights = reloaded["pre-decay"]
    assert batch == 6
    for name, tensor in snapshots[6].items():
        assert torch.equal(weights[name], tensor), name
    # The spike at 6: the checkpoint at 6 computed it, so the rollback went to 4; weights after it equal 4's.
    (entry,) = [json.loads(line) for line in (folder / "loss_spikes.jsonl").read_text().splitlines()]
    assert (entry["spike_batch"], entry["checkpoint"], entry["skipped"]["batch"]) == (
        6,
        str(restored),
        [4, 7],
    )
    batch, weights = reloaded["restored"]
    assert batch == 4
    for name, tensor in snapshots[7].items():
        assert torch.equal(weights[name], tensor), name
    assert not all(torch.equal(snapshots[6][k], snapshots[7][k]) for k in snapshots[6])


if __name__ == "__main__":
    _fsdp_main(sys.argv[1], sys.argv[2])
