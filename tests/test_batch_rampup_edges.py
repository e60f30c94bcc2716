"""The batch ramp-up's edges: the recipe section's schedule, the plan of step sizes against a hand
table, the refusal of a batch that Composer counts differently and the token-count warning word for
word, and the logged sizes (the mutation tests' reference, ``python -m tests.mutants batch_rampup``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from callbacks.batch_rampup import BatchRampSchedule, BatchRampupConfig, RampedBatches
from tests.test_batch_rampup import MB, sample, schedule, train


def test_the_recipe_section_builds_the_schedule_field_by_field() -> None:
    section = BatchRampupConfig(start_batch_tokens=24, ramp_tokens=96)
    assert section.schedule(64, seq_len=4, device_microbatch_size=2, world_size=2) == BatchRampSchedule(
        start_batch_tokens=24,
        target_batch_tokens=64,
        ramp_tokens=96,
        seq_len=4,
        device_microbatch_size=2,
        world_size=2,
    )


def test_the_plan_follows_the_hand_table() -> None:
    # start 8, target 32 tokens over 32 tokens, seq 4, one sample per micro-batch, one rank: unit 4,
    # k(t) = max(1, (8 * 32 + 24 t) // (32 * 4)):
    #   t = 0: 256 // 128 = 2 samples (8 tokens); t = 8: 448 // 128 = 3 (12 tokens);
    #   t = 20: 736 // 128 = 5 (20 tokens); t = 40 >= 32: the target, 32 / 4 = 8 samples.
    ramp = BatchRampSchedule(8, 32, 32, seq_len=4, device_microbatch_size=1)
    assert ramp.plan(0) == []
    assert ramp.plan(1) == [2]
    assert ramp.plan(40) == [2, 3, 5]
    assert ramp.plan(41) == [2, 3, 5, 8]


def test_a_batch_composer_counts_differently_is_refused_word_for_word(tmp_path: Path) -> None:
    data = [sample(i) for i in range(16)]
    loader = RampedBatches(DataLoader(data, batch_size=MB), schedule())
    # Composer is told each batch holds one sample; the ramp's first batch held two.
    miscounted = DataSpec(loader, get_num_samples_in_batch=lambda batch: 1)
    message = (
        "BatchRampup: this batch starts at global sample 2 of the ramp but Composer's timestamp is at sample "
        "1, so batch sizes and data would not match an uninterrupted run. Likely causes: resuming a dataset "
        "without state_dict (map-style) with spin_dataloaders=False (keep the Trainer's spin_dataloaders=True); "
        "a get_num_samples_in_batch that does not count the batch's rows; ranks yielding different numbers "
        "of samples"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        train(miscounted, "3ba", tmp_path)


def rampup_warnings(loader: RampedBatches | DataSpec, duration: str, tmp: Path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(loader, duration, tmp)
    return [str(w.message) for w in caught if str(w.message).startswith("BatchRampup")]


def test_a_token_count_other_than_samples_times_seq_len_is_warned_once(tmp_path: Path) -> None:
    data = [sample(i) for i in range(16)]
    # Composer counts one token per batch; the ramp counts samples x seq_len: after batch 0, 1 vs 2 x 4.
    one_token = DataSpec(
        RampedBatches(DataLoader(data, batch_size=MB), schedule()), get_num_tokens_in_batch=lambda batch: 1
    )
    assert rampup_warnings(one_token, "4ba", tmp_path / "a") == [
        "BatchRampup: Composer counted 1 tokens but the ramp counts samples x seq_len = 8; the ramp follows "
        "the latter"
    ]
    # Composer's own count (input_ids.numel()) is the ramp's: nothing to say.
    assert (
        rampup_warnings(RampedBatches(DataLoader(data, batch_size=MB), schedule()), "4ba", tmp_path / "b")
        == []
    )


def test_the_logged_sizes_follow_the_table_and_count_a_short_micro_batch(tmp_path: Path) -> None:
    # 7 samples: the table's 2, 2, 2 samples, then the epoch's last micro-batch, of 1 sample.
    data = [sample(i) for i in range(7)]
    metrics = InMemoryLogger()
    trainer = train(
        RampedBatches(DataLoader(data, batch_size=MB), schedule()), "4ba", tmp_path, loggers=[metrics]
    )
    assert [len(s) for s in trainer.recorder.samples] == [2, 2, 2, 1]  # type: ignore[attr-defined]
    logged = {
        key: [v for _, v in metrics.data[f"batch_rampup/{key}"]]
        for key in ("global_batch_size", "microbatches_per_rank")
    }
    assert logged == {"global_batch_size": [2, 2, 2, 1], "microbatches_per_rank": [1, 1, 1, 1]}
    assert all(type(v) is int for values in logged.values() for v in values)  # counts, not 2.0


def test_another_microbatch_size_in_the_trainer_is_warned_word_for_word(tmp_path: Path) -> None:
    data = [sample(i) for i in range(16)]
    # The ramp concatenates micro-batches of one sample; the Trainer re-splits into MB = 2.
    one_sample = RampedBatches(DataLoader(data, batch_size=1), schedule(device_microbatch_size=1))
    assert rampup_warnings(one_sample, "2ba", tmp_path) == [
        "BatchRampup: device_train_microbatch_size=2 differs from the ramp's device_microbatch_size=1; batches "
        "are still exact, but Composer re-splits them into micro-batches of the former"
    ]


def test_the_loader_and_callback_refusals_word_for_word(tmp_path: Path) -> None:
    with pytest.raises(
        TypeError,
        match="^"
        + re.escape(
            "RampedBatches has no length (the number of batches depends on the ramp): set max_duration in tokens, "
            "samples or batches"
        )
        + "$",
    ):
        len(RampedBatches(DataLoader([sample(0)], batch_size=MB), schedule()))
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "BatchRampup: the train dataloader is a DataLoader, not a RampedBatches: wrap it with "
            "RampedBatches(loader, schedule), or remove the BatchRampup callback"
        )
        + "$",
    ):
        train(DataLoader([sample(i) for i in range(4)], batch_size=MB), "1ba", tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        ((torch.zeros(4, dtype=torch.long),), "list"),  # a tuple of tensors (the DataLoader makes it a list)
        ({"input_ids": [1, 2, 3, 4]}, "dict"),  # a dict holding a list
    ],
)
def test_a_loader_yielding_other_than_dicts_of_tensors_is_refused(item: object, kind: str) -> None:
    # batch_size=None: the DataLoader hands each item over as it is (no collation into tensors).
    ramped = RampedBatches(DataLoader([item, item], batch_size=None), schedule())
    message = f"RampedBatches: the data loader must yield dicts of tensors, got {kind}"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        next(iter(ramped))


def test_after_an_epoch_that_ends_on_a_batch_boundary_the_ramp_continues() -> None:
    # 20 samples: the table's 2, 2, 2, 4, 4, 6 (80 tokens) end the epoch exactly. The next epoch starts
    # at t = 80 >= 64: the target, 8 samples per batch (the last 4 left).
    data = [sample(i) for i in range(20)]
    ramped = RampedBatches(DataLoader(data, batch_size=MB), schedule())
    assert [len(b["input_ids"]) for b in ramped] == [2, 2, 2, 4, 4, 6]
    assert ramped.start_sample == 20
    assert [len(b["input_ids"]) for b in ramped] == [8, 8, 4]
    # Per rank a batch has no fixed size (Composer records the loader's batch_size in checkpoints).
    assert ramped.batch_size is None


def test_schedule_edges_against_hand_values() -> None:
    # The smallest schedule: one token per unit, a target of 1 token, no ramp.
    assert BatchRampSchedule(1, 1, 0, seq_len=1, device_microbatch_size=1).plan(3) == [1, 1, 1]
    # A start equal to the target: no growth over the ramp.
    assert schedule(start_batch_tokens=32).plan(144) == [8] * 5
    with pytest.raises(
        ValueError,
        match=re.escape(
            "batch_rampup.target_batch_tokens=0 must be a positive multiple of seq_len * device_microbatch_size "
            "* world_size = 4 * 2 * 1 = 8: set it to 8 or 16"
        ),
    ):
        schedule(target_batch_tokens=0, start_batch_tokens=0)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "batch_rampup.start_batch_tokens=40 must be in [1, target_batch_tokens=32]; values below 8 (one "
            "micro-batch per rank) start at one micro-batch"
        )
        + "$",
    ):
        schedule(start_batch_tokens=40)
    with pytest.raises(ValueError, match="^" + re.escape("batch_rampup: tokens_seen=-1 must be >= 0") + "$"):
        schedule().per_rank_microbatches(-1)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "RampedBatches: the data loader's batch_size=4 must equal batch_rampup device_microbatch_size=2: build "
            "the loader with the micro-batch size (the ramp concatenates micro-batches)"
        )
        + "$",
    ):
        RampedBatches(DataLoader([sample(0)], batch_size=4), schedule())
