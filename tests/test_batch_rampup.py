"""Batch-size ramp-up: the schedule against a hand-computed table, the wrapper, exact resumption.

The table used throughout (seq_len 4, micro-batch 2, one rank: one unit = 8 tokens; start 8,
target 32 tokens over 64 tokens, so b(t) = 8 + 24 t / 64 and k = floor(b / 8)):

    step  tokens before  b(t)  k  global batch (samples)  tokens after
    0       0             8    1   2                        8
    1       8            11    1   2                       16
    2      16            14    1   2                       24
    3      24            17    2   4                       40
    4      40            23    2   4                       56
    5      56            29    3   6                       80
    6      80            32    4   8                      112   (t >= 64: the target)
    7     112            32    4   8                      144

Resumption is checked with a real Trainer and real checkpoints, for a map-style dataset (Composer
re-iterates the epoch), a StreamingDataset over MDS shards (its state_dict), with and without
DataLoader workers, and under ``composer -n 2`` (marked dist and slow).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, DataSpec, State
from composer.loggers import Logger
from composer.models import ComposerModel
from composer.utils import dist
from streaming import MDSWriter, StreamingDataset
from torch import nn
from torch.utils.data import DataLoader

from callbacks.batch_rampup import BatchRampSchedule, BatchRampup, RampedBatches
from data.loader import _with_shared_memory_retry
from data.shared_memory import clean_stale_shared_memory, machine_turn

SEQ, MB, VOCAB = 4, 2, 512
TABLE_K = [1, 1, 1, 2, 2, 3, 4, 4]
TABLE_TOKENS_BEFORE = [0, 8, 16, 24, 40, 56, 80, 112]


def schedule(**overrides: int) -> BatchRampSchedule:
    cfg = dict(
        start_batch_tokens=8, target_batch_tokens=32, ramp_tokens=64, seq_len=SEQ, device_microbatch_size=MB
    )
    cfg.update(overrides)
    return BatchRampSchedule(**cfg)


def sample(i: int) -> dict[str, torch.Tensor]:
    """Sample i: input_ids i*SEQ .. i*SEQ+SEQ-1 (unique per sample), labels shifted by one."""
    ids = torch.arange(i * SEQ, (i + 1) * SEQ) % VOCAB
    return {"input_ids": ids, "labels": (ids + 1) % VOCAB}


def sample_index(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] // SEQ).tolist()


def flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


# ---------------------------------------------------------------- schedule


def test_schedule_matches_hand_table() -> None:
    s = schedule()
    assert s.unit_tokens == 8 and s.target_microbatches == 4
    assert [s.per_rank_microbatches(t) for t in TABLE_TOKENS_BEFORE] == TABLE_K
    assert [s.global_batch_size(t) for t in TABLE_TOKENS_BEFORE] == [2 * k for k in TABLE_K]
    assert s.plan(144) == [2 * k for k in TABLE_K]
    # Rounding down: 23 tokens (t = 40) is 2 units, 24 (t = 42.67, first reached at t = 43) is 3.
    assert s.per_rank_microbatches(42) == 2 and s.per_rank_microbatches(43) == 3
    assert s.per_rank_microbatches(63) == 3 and s.per_rank_microbatches(64) == 4
    assert s.per_rank_microbatches(10**12) == 4


def test_schedule_two_ranks_and_edges() -> None:
    # Two ranks: one unit = 4 * 2 * 2 = 16 tokens; the same ramp shape in global samples.
    s = schedule(start_batch_tokens=16, target_batch_tokens=64, ramp_tokens=128, world_size=2)
    assert s.plan(288) == [4, 4, 4, 8, 8, 12, 16, 16]
    # A start below one unit begins at one micro-batch per rank; ramp 0 is the target throughout.
    assert schedule(start_batch_tokens=1).per_rank_microbatches(0) == 1
    assert schedule(ramp_tokens=0).plan(64) == [8, 8]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(target_batch_tokens=36),
            r"target_batch_tokens=36 must be a positive multiple of .* = 8: set it to 32 or 40",
        ),
        (dict(target_batch_tokens=64, world_size=3), r"= 24: set it to 48 or 72"),
        (dict(start_batch_tokens=40), r"start_batch_tokens=40 must be in \[1, target_batch_tokens=32\]"),
        (dict(start_batch_tokens=0), r"start_batch_tokens=0 must be in"),
        (dict(ramp_tokens=-1), r"ramp_tokens=-1 must be >= 0"),
        (dict(device_microbatch_size=0), r"device_microbatch_size=0 must be an integer >= 1"),
        (dict(seq_len=0), r"seq_len=0 must be an integer >= 1"),
    ],
)
def test_schedule_errors_name_the_key(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        schedule(**overrides)


# ---------------------------------------------------------------- wrapper


def test_wrapper_follows_table_and_keeps_every_sample() -> None:
    data = [sample(i) for i in range(26)]  # 13 micro-batches per epoch
    ramped = RampedBatches(DataLoader(data, batch_size=MB), schedule())
    with pytest.raises(TypeError, match="no length"):
        len(ramped)
    assert ramped.dataset is data
    epoch1 = list(ramped)
    # 1+1+1+2+2+3 = 10 micro-batches, then the 3 left form a short last batch (k would be 4).
    assert [len(b["input_ids"]) for b in epoch1] == [2, 2, 2, 4, 4, 6, 6]
    assert flat([sample_index(b) for b in epoch1]) == list(range(26))
    assert all(torch.equal(b["labels"], (b["input_ids"] + 1) % VOCAB) for b in epoch1)
    # The ramp continues in the next epoch: 52 samples = 208 tokens seen, past the ramp.
    assert ramped.start_sample == 26
    assert [len(b["input_ids"]) for b in ramped] == [8, 8, 8, 2]


def test_wrapper_with_prefetching_workers_drops_nothing() -> None:
    data = [sample(i) for i in range(36)]
    loader = DataLoader(data, batch_size=MB, num_workers=2, prefetch_factor=4)
    sizes, order = [], []
    for batch in RampedBatches(loader, schedule()):
        sizes.append(len(batch["input_ids"]))
        order += sample_index(batch)
    assert sizes == [2 * k for k in TABLE_K]
    assert order == list(range(36))


def test_wrapper_refuses_other_microbatch_size() -> None:
    with pytest.raises(ValueError, match=r"batch_size=4 must equal batch_rampup device_microbatch_size=2"):
        RampedBatches(DataLoader([sample(0)], batch_size=4), schedule())


# ---------------------------------------------------------------- Composer resumption


class TinyLM(ComposerModel):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.emb(batch["input_ids"]))

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), batch["labels"].flatten())


class Recorder(Callback):
    """Per step: the samples of the batch and the timestamp after the step."""

    def __init__(self) -> None:
        self.samples: list[list[int]] = []
        self.after: list[tuple[int, int, int]] = []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.samples.append(sample_index(state.batch))

    def batch_end(self, state: State, logger: Logger) -> None:
        ts = state.timestamp
        self.after.append((int(ts.epoch), int(ts.sample), int(ts.token)))


def train(
    loader: RampedBatches | DataSpec,
    duration: str,
    tmp: Path,
    load_path: str | None = None,
    sgd_lr: float | None = None,
    **kwargs: object,
) -> Trainer:
    recorder = Recorder()
    torch.manual_seed(17)  # the same initial weights in every run
    model = TinyLM()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=sgd_lr)
        if sgd_lr
        else torch.optim.AdamW(model.parameters(), lr=1e-2),
        max_duration=duration,
        device_train_microbatch_size=MB,
        callbacks=[BatchRampup(), recorder],
        device="cpu",
        precision="fp32",
        seed=17,
        save_folder=str(tmp),
        save_filename="ba{batch}.pt",
        save_interval="1ba",
        load_path=load_path,
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )
    trainer.recorder = recorder  # type: ignore[attr-defined]
    trainer.fit()
    return trainer


def assert_resumed_exactly(full: Trainer, resumed: Trainer, start: int) -> None:
    assert resumed.recorder.samples == full.recorder.samples[start:]  # type: ignore[attr-defined]
    assert resumed.recorder.after == full.recorder.after[start:]  # type: ignore[attr-defined]
    a, b = full.state.timestamp, resumed.state.timestamp
    assert (a.epoch, a.batch, a.sample, a.token) == (b.epoch, b.batch, b.sample, b.token)
    for (name, p), q in zip(full.state.model.state_dict().items(), resumed.state.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_map_style_dataset_mid_ramp(tmp_path: Path) -> None:
    """A map-style dataset (no state_dict): Composer re-iterates the epoch and skips the batches seen."""
    data = [sample(i) for i in range(26)]

    def loader() -> RampedBatches:
        return RampedBatches(
            DataLoader(data, batch_size=MB, sampler=dist.get_sampler(data, shuffle=True)), schedule()
        )

    full = train(loader(), "10ba", tmp_path / "full")
    # Epoch 1 (26 samples): the table up to step 5, then the 3 micro-batches left; epoch 2 at the target.
    sizes = [len(s) for s in full.recorder.samples]
    assert sizes == [2, 2, 2, 4, 4, 6, 6, 8, 8, 8]
    assert sorted(flat(full.recorder.samples[:7])) == list(range(26))

    # The DistributedSampler's shuffle (seed 0), re-drawn each epoch: Composer calls set_epoch on the
    # RampedBatches' sampler, which is the inner loader's. Epoch e is randperm(26) seeded 0 + e.
    def shuffled(epoch: int) -> list[int]:
        return torch.randperm(26, generator=torch.Generator().manual_seed(epoch)).tolist()

    assert flat(full.recorder.samples[:7]) == shuffled(0) != list(range(26))
    assert flat(full.recorder.samples[7:]) == shuffled(1)[:24]
    assert [t for _, _, t in full.recorder.after] == list(np.cumsum([n * SEQ for n in sizes]))
    # Composer counts the epoch once the loader is exhausted, after the short batch's BATCH_END.
    assert full.recorder.after[6] == (0, 26, 104) and full.recorder.after[7][0] == 1

    half = train(loader(), "5ba", tmp_path / "half")
    assert half.recorder.samples == full.recorder.samples[:5]
    resumed = train(loader(), "10ba", tmp_path / "r5", load_path=str(tmp_path / "half" / "ba5.pt"))
    assert_resumed_exactly(full, resumed, 5)
    # At the end of epoch 1 (saved before Composer counts the epoch), and inside epoch 2, where the
    # spin re-draws the epoch's shuffle through the DistributedSampler's set_epoch.
    # (Resuming at the end of an epoch, Composer first runs the epoch's empty remainder and warns.)
    with pytest.warns(UserWarning, match="No batches were trained"):
        resumed = train(loader(), "10ba", tmp_path / "r7", load_path=str(tmp_path / "full" / "ba7.pt"))
    assert_resumed_exactly(full, resumed, 7)
    resumed = train(loader(), "10ba", tmp_path / "r8", load_path=str(tmp_path / "full" / "ba8.pt"))
    assert_resumed_exactly(full, resumed, 8)

    with pytest.raises(RuntimeError, match="keep the Trainer's spin_dataloaders=True"):
        train(
            loader(),
            "10ba",
            tmp_path / "nospin",
            load_path=str(tmp_path / "half" / "ba5.pt"),
            spin_dataloaders=False,
        )


class TokenDataset(StreamingDataset):
    """MDS samples of SEQ + 1 tokens -> input_ids, labels."""

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(super().get_item(sample_id, retry)["tokens"].astype(np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


@pytest.fixture
def mds(tmp_path: Path) -> Path:
    clean_stale_shared_memory()
    out = tmp_path / "mds"
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}, size_limit=1 << 10) as writer:
        for i in range(40):
            writer.write({"tokens": np.arange(i * SEQ, (i + 1) * SEQ + 1, dtype=np.int32) % VOCAB})
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_streaming_dataset_mid_ramp(tmp_path: Path, mds: Path, num_workers: int) -> None:
    """A StreamingDataset: Composer saves state_dict(sample_in_epoch) and the dataset resumes there."""
    caches = iter(range(100))

    def loader() -> DataSpec:
        # In turn and retried, as data.loader builds its datasets beside the other pytest workers.
        cache = str(tmp_path / f"cache{next(caches)}")
        with machine_turn():  # as data.loader builds its datasets: other workers' jobs wait
            dataset = _with_shared_memory_retry(
                lambda: TokenDataset(
                    remote=str(mds),
                    local=cache,
                    batch_size=MB,
                    shuffle=True,
                    shuffle_seed=5,
                    num_canonical_nodes=1,
                )
            )
        inner = DataLoader(
            dataset, batch_size=MB, num_workers=num_workers, persistent_workers=num_workers > 0
        )
        # As data.loader serves it: a DataSpec counting input_ids.numel() tokens.
        return DataSpec(
            RampedBatches(inner, schedule()), get_num_tokens_in_batch=lambda b: b["input_ids"].numel()
        )

    full = train(loader(), "10ba", tmp_path / "full")
    sizes = [len(s) for s in full.recorder.samples]
    # 20 micro-batches per epoch: 1+1+1+2+2+3+4+4 = 18, then 2 left; epoch 2 at the target.
    assert sizes == [2, 2, 2, 4, 4, 6, 8, 8, 4, 8]
    assert sorted(flat(full.recorder.samples[:9])) == list(range(40))
    assert full.recorder.after[8] == (0, 40, 160) and full.recorder.after[9] == (1, 48, 192)

    half = train(loader(), "5ba", tmp_path / "half")
    assert half.recorder.samples == full.recorder.samples[:5]
    saved = torch.load(tmp_path / "half" / "ba5.pt", weights_only=False)
    assert saved["state"]["dataset_state"]["train"]["sample_in_epoch"] == 14
    resumed = train(loader(), "10ba", tmp_path / "r5", load_path=str(tmp_path / "half" / "ba5.pt"))
    assert_resumed_exactly(full, resumed, 5)
    # At the end of epoch 1: the dataset state says all 40 samples were seen.
    with pytest.warns(UserWarning, match="No batches were trained"):
        resumed = train(loader(), "10ba", tmp_path / "r9", load_path=str(tmp_path / "full" / "ba9.pt"))
    assert_resumed_exactly(full, resumed, 9)


def test_step_averages_the_gradient_over_the_whole_batch(tmp_path: Path) -> None:
    """A batch of k = 3 micro-batches: Composer's update is that of the mean loss over all 6 samples."""
    data = [sample(i) for i in range(6)]
    torch.manual_seed(17)
    reference = TinyLM()
    batch = {key: torch.stack([d[key] for d in data]) for key in data[0]}
    reference.loss(reference(batch), batch).backward()
    # train() builds its model from the same seed, so with the same initial weights.
    trainer = train(
        RampedBatches(DataLoader(data, batch_size=MB), schedule(start_batch_tokens=24)),
        "1ba",
        tmp_path,
        sgd_lr=0.5,
    )
    assert trainer.recorder.samples == [list(range(6))]  # type: ignore[attr-defined]
    for (name, p), q in zip(reference.named_parameters(), trainer.state.model.parameters()):
        torch.testing.assert_close(q.detach(), p.detach() - 0.5 * p.grad, msg=name)


def test_duration_in_tokens_and_no_epochs(tmp_path: Path) -> None:
    """Without a length Composer runs token/batch durations and refuses epoch durations."""
    data = [sample(i) for i in range(40)]
    trainer = train(RampedBatches(DataLoader(data, batch_size=MB), schedule()), "56tok", tmp_path / "a")
    assert [len(s) for s in trainer.recorder.samples] == [2, 2, 2, 4, 4]  # type: ignore[attr-defined]
    assert int(trainer.state.timestamp.token) == 56
    with pytest.raises(ValueError, match="max_duration cannot be specified in epochs"):
        train(RampedBatches(DataLoader(data, batch_size=MB), schedule()), "1ep", tmp_path / "b")


def test_callback_needs_the_wrapper(tmp_path: Path) -> None:
    data = [sample(i) for i in range(8)]
    with pytest.raises(ValueError, match="not a RampedBatches: wrap it with RampedBatches"):
        train(DataLoader(data, batch_size=MB), "2ba", tmp_path)  # type: ignore[arg-type]


def test_callback_checks_world_size(tmp_path: Path) -> None:
    data = [sample(i) for i in range(8)]
    two_ranks = schedule(start_batch_tokens=16, target_batch_tokens=64, world_size=2)
    with pytest.raises(ValueError, match="world_size=2 but the run has 1 ranks"):
        train(RampedBatches(DataLoader(data, batch_size=MB), two_ranks), "2ba", tmp_path)


# ---------------------------------------------------------------- two ranks (composer -n 2)

TWO_RANKS = dict(start_batch_tokens=16, target_batch_tokens=64, ramp_tokens=128, world_size=2)


def write_mds(out: Path, n: int) -> None:
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}, size_limit=1 << 10) as writer:
        for i in range(n):
            writer.write({"tokens": np.arange(i * SEQ, (i + 1) * SEQ + 1, dtype=np.int32) % VOCAB})


def two_rank_main(out: Path) -> None:
    """Run by test_two_ranks_resume_exactly under ``composer -n 2``: per dataset kind, a straight run and
    one resumed from its step-5 checkpoint; each rank saves what it saw."""
    rank, caches = dist.get_global_rank(), iter(range(100))

    def loader(kind: str) -> RampedBatches:
        if kind == "streaming":
            with machine_turn():
                dataset = TokenDataset(
                    remote=str(out / "mds"),
                    local=str(out / f"cache{next(caches)}"),
                    batch_size=MB,
                    shuffle=True,
                    shuffle_seed=5,
                    num_canonical_nodes=1,
                )
            return RampedBatches(DataLoader(dataset, batch_size=MB), schedule(**TWO_RANKS))
        data = [sample(i) for i in range(80)]
        sampler = dist.get_sampler(data, shuffle=True)
        return RampedBatches(DataLoader(data, batch_size=MB, sampler=sampler), schedule(**TWO_RANKS))

    result: dict[str, dict[str, dict]] = {}
    for kind in ("streaming", "map"):
        full = train(loader(kind), "10ba", out / kind / "full")
        resumed = train(
            loader(kind), "10ba", out / kind / "r5", load_path=str(out / kind / "full" / "ba5.pt")
        )
        result[kind] = {
            name: {
                "samples": trainer.recorder.samples,  # type: ignore[attr-defined]
                "after": trainer.recorder.after,  # type: ignore[attr-defined]
                "weights": {k: v.clone() for k, v in trainer.state.model.module.state_dict().items()},
            }
            for name, trainer in (("full", full), ("resumed", resumed))
        }
        full.close()
        resumed.close()
    torch.save(result, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_resume_exactly(tmp_path: Path) -> None:
    """Two ranks (gloo, DDP): Streaming's per-rank partition and a DistributedSampler both resume exactly."""
    clean_stale_shared_memory()
    write_mds(tmp_path / "mds", 80)
    composer = Path(sys.executable).parent / "composer"
    cmd = [str(composer), "-n", "2", "--master_port", str(free_port()), __file__, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for kind in ("streaming", "map"):
        full = [r[kind]["full"] for r in ranks]
        # Per rank the table's micro-batch counts (one unit = 16 tokens: a micro-batch on each rank).
        # 40 samples per rank = 20 micro-batches: 1+1+1+2+2+3+4+4 = 18, 2 left, then the next epoch.
        for r in range(2):
            assert [len(s) for s in full[r]["samples"]] == [2, 2, 2, 4, 4, 6, 8, 8, 4, 8], (kind, r)
        global_sizes = [4, 4, 4, 8, 8, 12, 16, 16, 8, 16]
        assert [a[1] for a in full[0]["after"]] == list(np.cumsum(global_sizes)), kind
        assert [a[2] for a in full[0]["after"]] == list(SEQ * np.cumsum(global_sizes)), kind
        assert full[0]["after"] == full[1]["after"]
        assert sorted(flat(full[0]["samples"][:9] + full[1]["samples"][:9])) == list(range(80)), kind
        for r in range(2):
            resumed = ranks[r][kind]["resumed"]
            assert resumed["samples"] == full[r]["samples"][5:], (kind, r)
            assert resumed["after"] == full[r]["after"][5:], (kind, r)
            for key, value in full[r]["weights"].items():
                assert torch.equal(value, resumed["weights"][key]), (kind, r, key)


if __name__ == "__main__":
    two_rank_main(Path(sys.argv[1]))
