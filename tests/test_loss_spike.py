"""LossSpikeRollback: the detector rule on hand-made sequences, and planted spikes in a real Trainer."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from composer import Algorithm, Callback, Event, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.optim import LinearWithWarmupScheduler
from torch.utils.data import DataLoader, Dataset

from callbacks.loss_spike import LossSpikeRollback, SpikeDetector
from models.composer_model import ComposerMambaLM
from models.config import preset

PEAK_LR = 1e-3
SEQ = 16
N_BATCHES = 20

# ---------------------------------------------------------------------------------------------
# The rule alone


def test_threshold_is_mean_plus_the_larger_margin() -> None:
    # Window [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25) = 1.1180; 2 std = 2.2361 > 0.1 * 2.5.
    det = SpikeDetector(window=4, threshold_std=2.0, min_rel_increase=0.1, warmup_batches=4)
    for x in (1.0, 2.0, 3.0, 4.0):
        assert not det.check(x).spike
    verdict = det.check(4.74)
    assert verdict.spike
    assert (verdict.n, verdict.mean) == (4, 2.5)
    assert verdict.std == pytest.approx(math.sqrt(1.25))
    assert verdict.threshold == pytest.approx(2.5 + 2 * math.sqrt(1.25))
    assert list(det.history) == [1.0, 2.0, 3.0, 4.0]  # a spike never enters the window
    assert not det.check(4.73).spike
    assert list(det.history) == [2.0, 3.0, 4.0, 4.73]  # the window moves


def test_flat_window_uses_the_relative_margin() -> None:
    det = SpikeDetector(window=5, threshold_std=4.0, min_rel_increase=0.1, warmup_batches=5)
    for _ in range(5):
        det.check(2.0)
    assert det.check(2.21).spike  # std 0: threshold 2.0 * 1.1 = 2.2
    assert not det.check(2.19).spike


def test_not_armed_before_warmup_but_non_finite_always_spikes() -> None:
    det = SpikeDetector(window=10, threshold_std=1.0, min_rel_increase=0.0, warmup_batches=3)
    assert not det.check(5.0).spike
    assert not det.check(50.0).spike  # two losses: not armed yet
    assert det.check(float("nan")).spike
    assert det.check(float("inf")).spike
    assert list(det.history) == [5.0, 50.0]
    assert not det.check(20.0).spike  # two losses in the window: still not armed
    assert det.check(100.0).spike  # armed: mean 25, std 18.7


def test_a_falling_loss_never_spikes() -> None:
    """A warmup-stable-decay loss curve: fast early drop, slow noisy plateau, then the decay's fast drop."""
    rng = random.Random(0)
    losses = [10.0 * math.exp(-t / 200) + 3.0 for t in range(1000)]  # early training
    losses += [3.0 - 0.1 * t / 4000 for t in range(4000)]  # stable phase
    losses += [2.9 - 0.3 * (t / 1000) ** 0.5 for t in range(1000)]  # decay phase: the loss drops faster
    det = SpikeDetector()  # the defaults a run gets
    for x in losses:
        noisy = x * (1.0 + rng.gauss(0.0, 0.005))
        assert not det.check(noisy).spike, noisy
    # The same detector does see a rise of 15% at the end of the decay.
    assert det.check(losses[-1] * 1.15).spike


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="warmup_batches=80 must be in"):
        SpikeDetector(window=50, warmup_batches=80)
    with pytest.raises(ValueError, match="max_retries=0"):
        LossSpikeRollback(max_retries=0)


# ---------------------------------------------------------------------------------------------
# In a Trainer


class RandomTokens(Dataset):
    def __init__(self, n: int = 2 * N_BATCHES) -> None:
        g = torch.Generator().manual_seed(4321)
        self.tokens = torch.randint(0, 512, (n, SEQ + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:]}


class PoisonLoss(Algorithm):
    """Multiplies the loss (and so its gradient) by ``factor`` on the batches that start at ``batches``."""

    def __init__(self, batches: set[int], factor: float) -> None:
        self.batches = batches
        self.factor = factor

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_LOSS and int(state.timestamp.batch) in self.batches

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        state.loss = state.loss * self.factor


class Record(Callback):
    """After the rollback callback at each batch end: losses, weights, optimizer state and lr."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.after: dict[int, tuple[dict, dict, list[float]]] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        self.losses[batch - 1] = state.total_loss_dict["loss/train/total"]
        optimizer = state.optimizers[0]
        names = {p: n for n, p in state.model.named_parameters()}
        moments = {names[p]: copy.deepcopy(s) for p, s in optimizer.state.items()}
        lrs = [g["lr"] for g in optimizer.param_groups]
        self.after[batch] = (copy.deepcopy(state.model.state_dict()), moments, lrs)


def fit(tmp_path: Path, poison: PoisonLoss, rollback: LossSpikeRollback, record: Record) -> Trainer:
    torch.manual_seed(0)
    model = ComposerMambaLM(preset("debug"))
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(RandomTokens(), batch_size=2, shuffle=False),
        optimizers=torch.optim.AdamW(model.parameters(), lr=PEAK_LR),
        schedulers=LinearWithWarmupScheduler(t_warmup="0ba", alpha_f=0.0),
        max_duration=f"{N_BATCHES}ba",
        algorithms=[poison],
        callbacks=[rollback, record],  # the recorder runs after the rollback at each event
        save_folder=str(tmp_path / "ckpt"),
        save_interval="3ba",
        device="cpu",
        precision="fp32",
        progress_bar=False,
        seed=0,
    )
    trainer.fit()
    return trainer


def spike_settings(**kwargs: object) -> LossSpikeRollback:
    return LossSpikeRollback(window=8, threshold_std=4.0, min_rel_increase=0.1, warmup_batches=4, **kwargs)


def read_audit(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "ckpt" / "loss_spikes.jsonl").read_text().splitlines()]


def test_planted_spike_rolls_back_to_the_last_good_checkpoint(tmp_path: Path) -> None:
    record = Record()
    trainer = fit(tmp_path, PoisonLoss({10}, 1000.0), spike_settings(), record)
    trainer.close()

    # Checkpoints at 3, 6, 9, 12, ...: the one at 9 computed batch 9's (accepted) loss, so it is good.
    ckpt_path = tmp_path / "ckpt" / "ep0-ba9-rank0.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    weights, moments, lrs = record.after[11]  # right after the rollback at the end of batch 10
    for name, tensor in ckpt["state"]["model"].items():
        assert torch.equal(weights[name], tensor), name
    saved_optim = ckpt["state"]["optimizers"]["AdamW"]["state"]
    assert moments.keys() == saved_optim.keys()
    for name, slots in moments.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(slots[key], saved_optim[name][key]), (name, key)
    # The lr is the schedule's at the current time, not the checkpoint's: D2Z after 10 steps of 20
    # (Composer stepped the scheduler at batch 10's timestamp, before advancing it).
    assert lrs == [pytest.approx(PEAK_LR * (1 - 10 / N_BATCHES))]
    assert ckpt["state"]["optimizers"]["AdamW"]["param_groups"][0]["lr"] == pytest.approx(
        PEAK_LR * (1 - 8 / 20)
    )

    (entry,) = read_audit(tmp_path)
    assert entry["event"] == "rollback"
    assert entry["spike_batch"] == 10
    assert entry["loss"] == pytest.approx(record.losses[10])
    assert entry["loss"] > 100 * entry["window"]["mean"]
    assert entry["window"]["n"] == 8
    expected_mean = sum(record.losses[b] for b in range(2, 10)) / 8  # the last 8 accepted losses
    assert entry["window"]["mean"] == pytest.approx(expected_mean)
    assert entry["checkpoint"] == str(ckpt_path)
    ckpt_time = ckpt["state"]["timestamp"]["Timestamp"]
    tokens_per_batch = 2 * SEQ
    assert entry["skipped"] == {
        "batch": [9, 11],
        "sample": [18, 22],
        "token": [ckpt_time["token"], ckpt_time["token"] + 2 * tokens_per_batch],
    }
    assert ckpt_time["token"] == 9 * tokens_per_batch
    assert (entry["retry"], entry["max_retries"]) == (1, 3)

    # Training went on to the end, with the data moving forward (batch 11 is new data, not batch 9's).
    assert int(trainer.state.timestamp.batch) == N_BATCHES
    assert all(math.isfinite(record.losses[b]) for b in range(11, N_BATCHES))
    assert max(record.losses[b] for b in range(11, N_BATCHES)) < 1.1 * record.losses[9]


def test_gives_up_after_max_retries(tmp_path: Path) -> None:
    record = Record()
    with pytest.raises(RuntimeError, match=r"after 2 rollbacks without recovery .*loss_spikes\.jsonl"):
        fit(tmp_path, PoisonLoss(set(range(10, N_BATCHES)), 1000.0), spike_settings(max_retries=2), record)
    entries = read_audit(tmp_path)
    assert [e["event"] for e in entries] == ["rollback", "rollback", "give_up"]
    assert [e["spike_batch"] for e in entries] == [10, 11, 12]
    assert [e["retry"] for e in entries] == [1, 2, 3]
    # Both rollbacks went to 9: the checkpoint at 12 holds weights that computed a spike.
    assert {e["checkpoint"] for e in entries[:2]} == {str(tmp_path / "ckpt" / "ep0-ba9-rank0.pt")}
    assert entries[1]["skipped"]["batch"] == [9, 12]


def test_spike_before_any_checkpoint_is_recorded_and_counts_as_a_retry(tmp_path: Path) -> None:
    """A NaN at batch 1 (first checkpoint at 3): nothing to restore, the NaN weights keep failing."""
    record = Record()
    with pytest.raises(RuntimeError, match="max_retries=3"):
        fit(tmp_path, PoisonLoss({1}, float("nan")), spike_settings(max_retries=3), record)
    entries = read_audit(tmp_path)
    assert [e["event"] for e in entries] == ["no_checkpoint"] * 3 + ["give_up"]
    assert [e["spike_batch"] for e in entries] == [1, 2, 3, 4]
    assert all(e["loss"] == "nan" for e in entries)
    # The checkpoint at 3 exists but holds NaN weights that never produced an accepted loss.
    assert (tmp_path / "ckpt" / "ep0-ba3-rank0.pt").exists()


def test_a_checkpoint_is_good_only_once_its_own_loss_was_accepted(tmp_path: Path) -> None:
    """Spikes at 12 and 14. The checkpoint at 12 holds the weights that computed the spike at 12, so
    even after the accepted batch 13 the second rollback still goes to 9; batch 13 counts as a recovery
    (recovery_batches=1), so max_retries=1 does not stop the run."""
    record = Record()
    trainer = fit(
        tmp_path, PoisonLoss({12, 14}, 1000.0), spike_settings(max_retries=1, recovery_batches=1), record
    )
    trainer.close()
    entries = read_audit(tmp_path)
    assert [e["event"] for e in entries] == ["rollback", "rollback"]
    assert [e["spike_batch"] for e in entries] == [12, 14]
    assert [e["retry"] for e in entries] == [1, 1]
    assert {e["checkpoint"] for e in entries} == {str(tmp_path / "ckpt" / "ep0-ba9-rank0.pt")}
    assert [e["skipped"]["batch"] for e in entries] == [[9, 13], [9, 15]]
    assert (tmp_path / "ckpt" / "ep0-ba12-rank0.pt").exists()
    assert int(trainer.state.timestamp.batch) == N_BATCHES
