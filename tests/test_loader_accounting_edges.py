"""The loader's sample accounting, edge by edge (the mutation tests' reference for ``data.loader``,
``python -m tests.mutants loader``): the position ids of a sample against hand tables, the checks
of a read sample, the resumption state a checkpoint holds and what loading it does, and the identity
of a mix (recorded in checkpoints and releases) against a hand-written reference.

The datasets read shards written here directly with Streaming's MDSWriter (20 samples of 9 stored
tokens, unshuffled, one rank), so each test takes a fraction of a second."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter

from data.convert import sample_checksum
from data.loader import (
    DataConfig,
    PackedTokenDataset,
    ShardError,
    _with_shared_memory_retry,
    make_example,
    mix_id,
)
from data.mixture import StreamConfig
from data.shared_memory import clean_stale_shared_memory, machine_turn

EOT, PAD, VOCAB = 0, 1, 64
SAMPLES, STORED = 20, 9  # samples; stored tokens per sample (seq_len 8, plus the last label)


def stored_tokens(i: int) -> np.ndarray:
    """Sample i: ids 2 + i .. 10 + i, its largest id 10 + i; an odd sample's fifth token is an EOT, and
    the last sample ends with two pads (the end of the corpus)."""
    tokens = np.arange(2 + i, 2 + i + STORED, dtype=np.uint16)
    if i % 2:
        tokens[4] = EOT
    if i == SAMPLES - 1:
        tokens[-2:] = PAD
    return tokens


def stored_positions(i: int) -> list[int]:
    """By hand: the first document continues from doc_offset i; after an odd sample's EOT one starts at 0."""
    return [i, i + 1, i + 2, i + 3, i + 4, 0, 1, 2] if i % 2 else list(range(i, i + 8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data.convert's columns; sample 3's checksum is wrong (as after a flipped bit)."""
    out = tmp_path_factory.mktemp("mds")
    columns = {"tokens": f"ndarray:uint16:{STORED}", "doc_offset": "uint32", "crc32": "uint32"}
    with MDSWriter(out=str(out), columns=columns, size_limit=1 << 9) as writer:
        for i in range(SAMPLES):
            tokens = stored_tokens(i)
            crc = sample_checksum(tokens, i) ^ (1 if i == 3 else 0)
            writer.write({"tokens": tokens, "doc_offset": i, "crc32": crc})
    return out


@pytest.fixture(scope="module")
def unchecked_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of an older data.convert: no checksum column."""
    out = tmp_path_factory.mktemp("mds_old")
    columns = {"tokens": f"ndarray:uint16:{STORED}", "doc_offset": "uint32"}
    with MDSWriter(out=str(out), columns=columns, size_limit=1 << 9) as writer:
        for i in range(SAMPLES):
            writer.write({"tokens": stored_tokens(i), "doc_offset": i})
    return out


def dataset(remote: Path, cache: Path, mix: str = "a" * 64, vocab_size: int = VOCAB) -> PackedTokenDataset:
    with machine_turn():
        clean_stale_shared_memory()
        return _with_shared_memory_retry(
            lambda: PackedTokenDataset(
                eot_id=EOT,
                pad_id=PAD,
                vocab_size=vocab_size,
                mix_id=mix,
                remote=str(remote),
                local=str(cache),
                batch_size=2,
                shuffle=False,
            )
        )


def sample_ids(ds: PackedTokenDataset) -> list[int]:
    return [int(example["sample_id"]) for example in ds]


def saved_state(ds: PackedTokenDataset, samples_seen: int) -> dict:
    """What Composer saves ``samples_seen`` samples into the epoch (the dataset is being iterated)."""
    next(iter(ds))
    return ds.state_dict(samples_seen, from_beginning=True)


# ---------------------------------------------------------------- make_example


@pytest.mark.parametrize(
    ("tokens", "doc_offset", "positions"),
    [
        # No end-of-text: the sample continues a document from its offset.
        ([5, 6, 7, 8], 10, [10, 11, 12]),
        # An end-of-text first: only it belongs to the continued document.
        ([0, 5, 6, 7, 0, 8], 3, [3, 0, 1, 2, 3]),
        # Two in a row: a document of one token (the second end-of-text) at position 0.
        ([5, 0, 0, 6, 7], 2, [2, 3, 0, 0]),
        # An end-of-text as the last input: nothing after it in the sample, so nothing restarts.
        ([5, 6, 0, 9], 0, [0, 1, 2]),
    ],
)
def test_positions_restart_after_each_end_of_text(
    tokens: list[int], doc_offset: int, positions: list[int]
) -> None:
    ex = make_example(np.array(tokens, dtype=np.uint16), doc_offset, eot_id=EOT, pad_id=PAD)
    assert ex["position_ids"].tolist() == positions
    assert ex["input_ids"].tolist() == tokens[:-1]
    assert ex["labels"].tolist() == tokens[1:]


def test_padding_is_ignored_in_the_labels_only() -> None:
    ex = make_example(np.array([1, 5, 1, 1], dtype=np.uint16), 0, eot_id=EOT, pad_id=PAD)
    assert ex["input_ids"].tolist() == [1, 5, 1]
    assert ex["labels"].tolist() == [5, -100, -100]


# ---------------------------------------------------------------- get_item


def test_a_read_sample_is_its_stored_tokens_with_its_id(shards: Path, tmp_path: Path) -> None:
    ds = dataset(shards, tmp_path / "c")
    for i in (0, 7, 19):
        ex = ds.get_item(i)
        tokens = stored_tokens(i).astype(np.int64)
        assert ex["input_ids"].tolist() == tokens[:-1].tolist()
        assert ex["labels"].tolist() == [-100 if t == PAD else t for t in tokens[1:].tolist()]
        assert ex["position_ids"].tolist() == stored_positions(i)
        assert (
            ex["sample_id"].dtype == torch.int64 and ex["sample_id"].shape == () and int(ex["sample_id"]) == i
        )
    assert ds.get_item(19)["labels"].tolist()[-2:] == [-100, -100]


def test_a_wrong_checksum_names_the_shard_and_the_sample(shards: Path, tmp_path: Path) -> None:
    ds = dataset(shards, tmp_path / "c")
    assert ds.spanner[3] == (0, 3)  # the first shard holds more than 4 samples
    message = (
        f"shard {tmp_path / 'c' / 'shard.00000.mds'}, sample 3 (sample 3 of the dataset) is corrupt: its checksum "
        "does not match (the shard's bytes changed after conversion); re-run data.convert for this stream (or "
        "delete the shard's unpacked .mds file to unpack it again from the compressed one, whose hash is checked)"
    )
    with pytest.raises(ShardError, match=f"^{re.escape(message)}$"):
        ds.get_item(3)


def test_the_largest_id_the_vocabulary_holds_is_read_and_the_next_is_refused(
    shards: Path, tmp_path: Path
) -> None:
    # Sample 5's largest id is 10 + 5 = 15.
    assert int(dataset(shards, tmp_path / "a", vocab_size=16).get_item(5)["labels"].max()) == 15
    message = (
        f"shard {tmp_path / 'b' / 'shard.00000.mds'}, sample 5 (sample 5 of the dataset) is corrupt: it holds "
        "token id 15, outside the tokenizer's 15 ids; re-run data.convert"
    )
    with pytest.raises(ShardError, match=f"^{re.escape(message)} for this stream"):
        dataset(shards, tmp_path / "b", vocab_size=15).get_item(5)


def test_a_shard_evicted_before_its_read_is_fetched_again_up_to_seven_times(
    unchecked_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming re-fetches a shard whose file vanished (evicted under a cache limit) and reads again:
    1 + 7 attempts, Streaming's own default."""
    ds = dataset(unchecked_shards, tmp_path / "c")
    ds.get_item(0)  # fetches the shard into the cache
    shard, fetched = ds.shards[0], []

    class Evicted:
        def __init__(self, times: int) -> None:
            self.times = times

        def __getitem__(self, index: int) -> dict:
            if self.times:
                self.times -= 1
                raise FileNotFoundError(f"shard file gone ({self.times} more times)")
            return shard[index]

    monkeypatch.setattr(ds, "prepare_shard", lambda shard_id, blocking=True: fetched.append(shard_id))
    ds.shards[0] = Evicted(7)
    assert int(ds.get_item(2)["sample_id"]) == 2 and fetched == [0] * 7
    ds.shards[0] = Evicted(8)
    with pytest.raises(RuntimeError, match=r"shard file gone \(0 more times\)"):
        ds.get_item(2)


def test_shards_without_checksums_are_read(unchecked_shards: Path, tmp_path: Path) -> None:
    ds = dataset(unchecked_shards, tmp_path / "c")
    assert ds.get_item(3)["input_ids"].tolist() == stored_tokens(3)[:-1].tolist()


# ---------------------------------------------------------------- state_dict / load_state_dict


def test_the_state_counts_the_samples_and_names_the_mix(unchecked_shards: Path, tmp_path: Path) -> None:
    state = saved_state(dataset(unchecked_shards, tmp_path / "a", mix="m" * 64), 6)
    assert state == {
        "epoch": 0,
        "sample_in_epoch": 6,
        "num_canonical_nodes": 1,
        "shuffle_seed": 9176,
        "initial_physical_nodes": 1,
        "mix_id": "m" * 64,
    }
    # A run resumed at sample 4: Composer counts from the epoch's start (6), a count from this run's
    # start adds the 4 it skipped.
    resumed = dataset(unchecked_shards, tmp_path / "b", mix="m" * 64)
    resumed.load_state_dict({**state, "sample_in_epoch": 4})
    assert int(next(iter(resumed))["sample_id"]) == 4
    assert resumed.state_dict(6, True)["sample_in_epoch"] == 6
    assert resumed.state_dict(6, False)["sample_in_epoch"] == 10


def test_a_state_of_the_same_mix_resumes_at_its_sample(unchecked_shards: Path, tmp_path: Path) -> None:
    saved = saved_state(dataset(unchecked_shards, tmp_path / "a"), 6)
    resumed = dataset(unchecked_shards, tmp_path / "b")
    resumed.load_state_dict(saved)
    assert sample_ids(resumed) == list(range(6, SAMPLES))
    # A state saved before the mix was recorded (no mix_id) resumes too.
    older = dataset(unchecked_shards, tmp_path / "c")
    older.load_state_dict({k: v for k, v in saved.items() if k != "mix_id"})
    assert sample_ids(older) == list(range(6, SAMPLES))


def test_a_state_of_another_mix_starts_this_mix_from_its_first_sample(
    unchecked_shards: Path, tmp_path: Path
) -> None:
    saved = saved_state(dataset(unchecked_shards, tmp_path / "a", mix="0123456789ab" + "c" * 52), 6)
    message = (
        "the checkpoint's data position belongs to another mix (0123456789ab), this run reads fedcba987654: "
        "starting this mix from its first sample"
    )
    for cache in ("b", "c"):  # the state is not changed by loading it: a second dataset is warned too
        ds = dataset(unchecked_shards, tmp_path / cache, mix="fedcba987654" + "0" * 52)
        with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
            ds.load_state_dict(saved)
        assert sample_ids(ds) == list(range(SAMPLES))
    assert saved["mix_id"] == "0123456789ab" + "c" * 52


# ---------------------------------------------------------------- mix_id

STREAMS = {
    "web": StreamConfig(local="/data/web", proportion=0.75),
    "code": StreamConfig(local="/data/code", remote="s3://b/code", repeat=2.0, choose=None),
}


def test_the_mix_id_is_the_hash_of_its_canonical_description() -> None:
    cfg = DataConfig(mixture="yamls/data/demo.yaml", phase="stable", epoch_size=1000, shuffle_seed=7)
    # Written out by hand: sorted keys, streams by name, [proportion, repeat, choose]. A release
    # records this id; a change of format would make its data position unusable.
    canonical = (
        '{"epoch_size": 1000, "phase": "stable", "shuffle_seed": 7, "split": "train", '
        '"streams": {"code": [null, 2.0, null], "web": [0.75, null, null]}}'
    )
    assert mix_id(cfg, STREAMS, "train") == hashlib.sha256(canonical.encode()).hexdigest()
    assert json.loads(canonical)["streams"]["code"] == [None, 2.0, None]


def test_the_mix_id_follows_what_is_read_not_where_it_lives() -> None:
    cfg = DataConfig(mixture="a.yaml")
    base = mix_id(cfg, STREAMS, "train")
    moved = {
        name: dataclasses.replace(s, local="/elsewhere/" + name, remote=None) for name, s in STREAMS.items()
    }
    assert mix_id(DataConfig(mixture="b.yaml", root="/r"), dict(reversed(moved.items())), "train") == base
    changed = [
        mix_id(dataclasses.replace(cfg, phase="decay"), STREAMS, "train"),
        mix_id(cfg, STREAMS, "val"),
        mix_id(dataclasses.replace(cfg, epoch_size=10), STREAMS, "train"),
        mix_id(dataclasses.replace(cfg, shuffle_seed=1), STREAMS, "train"),
        mix_id(cfg, {"web": STREAMS["web"], "code2": STREAMS["code"]}, "train"),
        mix_id(cfg, {**STREAMS, "web": dataclasses.replace(STREAMS["web"], proportion=0.5)}, "train"),
        mix_id(cfg, {**STREAMS, "code": dataclasses.replace(STREAMS["code"], repeat=1.0)}, "train"),
        mix_id(cfg, {**STREAMS, "code": dataclasses.replace(STREAMS["code"], choose=5)}, "train"),
    ]
    assert len({base, *changed}) == 1 + len(changed)
