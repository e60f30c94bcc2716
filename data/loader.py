"""The training/eval data loader: a StreamingDataset over converted streams, served to Composer.

Each sample becomes a dict of int64 tensors of length L (= seq_len):

- ``input_ids``: stored tokens [0:L]; ``labels``: stored tokens [1:L+1] (already shifted),
  -100 where the target is padding;
- ``position_ids``: each input token's index in its document (the token after an end-of-text
  starts at 0; a sample that starts mid-document continues from the stored ``doc_offset``);
- ``sample_id``: the sample's index in the dataset (one per sample), for audits.

Every sample read is checked: its CRC-32 (written by ``data.convert``) and every token id below
the tokenizer's vocabulary; a failure names the shard file and the sample. A shard that fails
Streaming's own hash check when unpacked is named too, and never leaves a reader waiting.

Resumption is Streaming's own: Composer saves ``dataset.state_dict(samples_seen, True)`` in its
checkpoint and calls ``load_state_dict`` on resume, and the dataset skips exactly the samples
already served, for any number of ranks (a deterministic function of seed, epoch and the
``num_canonical_nodes`` partition). Planning a split (``plan_split``) reads the mixture's local index
files once and checks the shards' recorded tokenizer against the run's; building it
(``build_split_dataset``) reads none of them again, and first cleans shared memory left by a
crashed run (``data.shared_memory``), in this job's turn among the jobs on the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from composer.core import DataSpec
from omegaconf import MISSING
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from torch.utils.data import DataLoader

from common.cli import RunStopped
from common.config import ConfigError, report
from data.convert import CHECKSUM_COLUMN, META_KEY, sample_checksum
from data.mixture import StreamConfig, load_mixture, phase_streams
from data.shared_memory import clean_stale_shared_memory, machine_turn
from data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info

IGNORE_INDEX = -100
SPLITS = ("train", "val")


@dataclass
class DataConfig:
    """The ``data`` section of a training recipe: which mixture and phase, and how to stream it."""

    mixture: str = MISSING  # a mixture YAML, e.g. yamls/data/demo.yaml (paths relative to the launch folder)
    phase: str = "stable"  # a phase of that mixture (stable | decay ...)
    root: str | None = None  # overrides the mixture's ``root`` (where its streams live)
    epoch_size: int | None = None  # samples per epoch; None = as the weights give
    shuffle: bool = True
    shuffle_seed: int = 9176
    shuffle_algo: Literal["py1e", "py1br", "py1b", "py1s", "py2s", "naive"] = "py1e"
    shuffle_block_size: int | None = None  # None = Streaming's default
    num_canonical_nodes: int | None = None  # fix it to resume on a different number of nodes
    predownload: int | None = None
    cache_limit: str | None = None  # e.g. "100gb" for remote streams
    sampling_method: Literal["balanced", "fixed"] = "balanced"  # balanced: a new subset each epoch
    validate_hash: Literal["xxh64", "sha1"] | None = "xxh64"  # checked when a shard is unpacked; None = off
    download_timeout: float = 60.0
    num_workers: int = 0  # DataLoader worker processes (decoding is cheap; 0 serves from the trainer)
    drop_last: bool = True  # training split only: evaluation always scores every sample

    def __post_init__(self) -> None:
        problems = []
        if not self.mixture:
            problems.append("data.mixture is empty: set it to a mixture YAML such as yamls/data/demo.yaml")
        if self.epoch_size is not None and self.epoch_size < 1:
            problems.append(f"data.epoch_size={self.epoch_size} must be >= 1 or null")
        if self.num_workers < 0:
            problems.append(f"data.num_workers={self.num_workers} must be >= 0")
        report(problems)


class ShardError(RunStopped):
    """A shard or a sample failed its check, or could not be read; the message names it and the fix."""


@dataclass(frozen=True)
class ShardMeta:
    """What ``data.convert`` recorded in a split's index.json."""

    tokenizer: TokenizerInfo
    seq_len: int


def read_shard_meta(index_path: Path, stream_name: str) -> ShardMeta:
    """The tokenizer and sequence length recorded in a converted split's index.json."""
    if not index_path.is_file():
        raise FileNotFoundError(
            f"stream {stream_name!r}: no {index_path}; convert the corpus with `python -m data.convert --out "
            f"{index_path.parent.parent}` or fix the stream's local/remote path"
        )
    index = json.loads(index_path.read_text())
    if META_KEY not in index:
        raise ValueError(
            f"stream {stream_name!r}: {index_path} was not written by data.convert (no {META_KEY!r} key)"
        )
    meta = index[META_KEY]
    return ShardMeta(TokenizerInfo(**meta["tokenizer"]), int(meta["seq_len"]))


def make_example(tokens: np.ndarray, doc_offset: int, eot_id: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One stored sample (L + 1 tokens) -> input_ids, labels, position_ids (each L long)."""
    ids = tokens.astype(np.int64)
    inputs, labels = ids[:-1], ids[1:].copy()
    labels[labels == pad_id] = IGNORE_INDEX
    # Start of the document each input token belongs to: 0 for the first (possibly partial)
    # document, else one past the latest end-of-text before it.
    length = len(inputs)
    doc_start = np.zeros(length, dtype=np.int64)
    starts = np.flatnonzero(inputs[:-1] == eot_id) + 1
    doc_start[starts] = starts
    np.maximum.accumulate(doc_start, out=doc_start)
    positions = np.arange(length, dtype=np.int64) - doc_start
    positions[doc_start == 0] += doc_offset
    return {
        "input_ids": torch.from_numpy(inputs.copy()),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }


class PackedTokenDataset(StreamingDataset):
    """StreamingDataset of ``data.convert`` samples, decoded into model-ready tensors."""

    def __init__(self, *, eot_id: int, pad_id: int, vocab_size: int, mix_id: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size  # the tokenizer's: a stored id at or above it is corrupt data
        self.mix_id = mix_id
        self.seq_len = 0  # set by build_dataset from the shards' metadata
        self._shard_error: ShardError | None = None

    def shard_path(self, shard_id: int) -> str:
        """The local path of a shard's data file: the unpacked one if it exists, else the compressed one."""
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        raw, packed = self.shards[shard_id].file_pairs[0]
        path = os.path.join(stream.local, stream.split, raw.basename)
        if packed is not None and not os.path.exists(path):
            path = os.path.join(stream.local, stream.split, packed.basename)
        return path

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
        """The sample, checked: its CRC-32 (written at conversion) and every token id below the vocabulary."""
        if self._shard_error is not None:
            raise self._shard_error
        sample = super().get_item(sample_id, retry)
        tokens, doc_offset = sample["tokens"], int(sample["doc_offset"])
        stored = sample.get(CHECKSUM_COLUMN)
        problem = None
        if stored is not None and int(stored) != sample_checksum(tokens, doc_offset):
            problem = "its checksum does not match (the shard's bytes changed after conversion)"
        elif len(tokens) and int(tokens.max()) >= self.vocab_size:
            problem = f"it holds token id {int(tokens.max())}, outside the tokenizer's {self.vocab_size} ids"
        if problem is not None:
            shard_id, index_in_shard = self.spanner[sample_id]
            raise ShardError(
                f"shard {self.shard_path(shard_id)}, sample {index_in_shard} (sample {sample_id} of the "
                f"dataset) is corrupt: {problem}; re-run data.convert for this stream (or delete the "
                "shard's unpacked .mds file to unpack it again from the compressed one, whose hash is checked)"
            )
        return {
            **make_example(tokens, doc_offset, self.eot_id, self.pad_id),
            "sample_id": torch.tensor(sample_id, dtype=torch.int64),
        }

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's shard preparation, with failures (hash mismatch, bad zstd) naming the shard.

        Streaming 0.13 leaves a shard PREPARING when unpacking it fails, and its background
        thread, dying on the exception, never reports its exit, so every reader and the end of the
        epoch wait forever. Here the shard is put back to REMOTE, the error is kept, and in a
        background thread Streaming's stop event is set instead of raising, so every thread ends
        and ``__iter__`` (or the next ``get_item``) raises the error.
        """
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as exc:
            self._shard_states[shard_id] = _ShardState.REMOTE
            stream = self.streams[int(self.stream_per_shard[shard_id])]
            path = self.shard_path(shard_id)
            if stream.remote in (None, stream.local) and not os.path.exists(path):
                problem = (
                    f"shard file {path} is missing (deleted after the run checked its data); its stream is local, "
                    "with no remote copy to download it from: restore the file, or re-run data.convert for this "
                    "stream, then run the same command again"
                )
            elif stream.remote in (None, stream.local):
                problem = (
                    f"shard {path} is corrupt or unreadable ({exc}); re-run data.convert for this stream"
                )
            else:
                problem = (
                    f"shard {path} is corrupt or unreadable ({exc}); delete it from the local cache "
                    f"{stream.local} to download it again from {stream.remote}, or re-run data.convert for this stream"
                )
            self._shard_error = ShardError(problem)
            self._shard_error.__cause__ = exc
            if threading.current_thread() is threading.main_thread():
                raise self._shard_error from exc
            self._event.set()

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resumption state, tagged with the mix it belongs to."""
        return {**super().state_dict(num_samples, from_beginning), "mix_id": self.mix_id}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Resume where a checkpoint left off, unless it was saved for another mix.

        A new phase (the decay mix after the stable one) resumes the old checkpoint's weights
        but not its place in the data: its samples come from other streams, so it starts at
        the first sample of its own first epoch.
        """
        obj = dict(obj)
        saved_mix = obj.pop("mix_id", None)
        if saved_mix is not None and saved_mix != self.mix_id:
            warnings.warn(
                f"the checkpoint's data position belongs to another mix ({saved_mix[:12]}), this run reads "
                f"{self.mix_id[:12]}: starting this mix from its first sample",
                stacklevel=2,
            )
            return
        super().load_state_dict(obj)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Streaming prepares shards in a background thread; when that fails, its iterator just
        # stops early. Surface the failure here instead of ending the epoch silently.
        self._shard_error = None
        samples = super().__iter__()
        iteration = None  # Streaming's record of this pass, whose two threads download and index ahead
        try:
            for sample in samples:
                if iteration is None:
                    iteration = self._iterator  # set by Streaming before its first sample
                yield sample
        finally:
            # A pass abandoned mid-epoch (training stops at max_duration; an evaluation or a test takes
            # a few batches) is closed, not finished: Streaming then never stops its two threads, and
            # they poll every 7 ms for the rest of the process (each Trainer of an Inheritune loop, or
            # of a test session, left two more). Tell them to stop, without waiting for a download.
            if iteration is not None:
                iteration.non_blocking_exit()
            samples.close()
        if self._shard_error is not None:
            raise self._shard_error
        event = getattr(self, "_event", None)
        if event is not None and event.is_set():
            raise RuntimeError("a StreamingDataset background thread failed; see the traceback above")


def _initialize_dist() -> None:
    """Start torch.distributed now (as Composer's Trainer would) when several ranks run.

    Otherwise the cleanup and each StreamingDataset would create and destroy their own process
    group on the same port, and ranks racing through those cycles fail to connect. The backend
    is the one Composer's Trainer will ask for (NCCL with a GPU, else gloo).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from composer.utils import dist, get_device

        dist.initialize_dist(get_device(None))


def mix_id(cfg: DataConfig, streams: dict[str, StreamConfig], split: str) -> str:
    """Identity of what a loader serves: phase, split, stream names and weights, epoch, seed.

    Paths are left out so that a run resumes on a machine where the streams live elsewhere.
    """
    spec = {
        "phase": cfg.phase,
        "split": split,
        "streams": {name: [s.proportion, s.repeat, s.choose] for name, s in sorted(streams.items())},
        "epoch_size": cfg.epoch_size,
        "shuffle_seed": cfg.shuffle_seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def phase_streams_of(cfg: DataConfig) -> dict[str, StreamConfig]:
    """The streams of ``cfg.phase`` in ``cfg.mixture`` (with ``cfg.root`` applied): the mixture, read once."""
    overrides = [f"root={cfg.root}"] if cfg.root is not None else []
    return phase_streams(load_mixture(cfg.mixture, overrides), cfg.phase, source=cfg.mixture)


@dataclass(frozen=True)
class SplitPlan:
    """One split of a phase, checked against the run's tokenizer: all ``build_split_dataset`` needs.

    ``seq_len`` is the local streams' common sequence length (0 when every stream is remote: known
    once Streaming has downloaded their index files).
    """

    split: str
    streams: dict[str, StreamConfig]
    tokenizer: str  # the tokenizer's path, for messages
    info: TokenizerInfo
    mix_id: str
    seq_len: int

    def local_indexes(self) -> dict[str, Path]:
        """The index.json of each local stream of the split (a remote one is read by Streaming)."""
        return {
            name: Path(s.local) / self.split / "index.json"
            for name, s in self.streams.items()
            if s.remote is None
        }


def plan_split(
    cfg: DataConfig,
    streams: dict[str, StreamConfig],
    tokenizer: str | Path,
    info: TokenizerInfo,
    split: str = "train",
) -> SplitPlan:
    """Check ``split`` of the phase's ``streams`` against the tokenizer (``check_streams``: their
    index files, read here once) and return what building its dataset needs."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    plan = SplitPlan(split, streams, str(tokenizer), info, mix_id(cfg, streams, split), 0)
    local = plan.local_indexes()
    if not local:
        return plan
    return dataclasses.replace(plan, seq_len=check_streams(local, info, tokenizer))


def build_split_dataset(cfg: DataConfig, plan: SplitPlan, device_batch_size: int) -> PackedTokenDataset:
    """The dataset of a planned split; reads no file the plan read.

    ``split="train"`` applies the phase's weights and shuffling; other splits read each
    stream's held-out samples once, in order, unweighted. Only remote streams' index files,
    downloaded by Streaming here, are checked against the tokenizer now.
    """
    _initialize_dist()
    train = plan.split == "train"

    def streams() -> list[Stream]:  # new ones for every attempt: StreamingDataset changes them
        return [
            Stream(
                remote=s.remote,
                local=s.local or None,
                split=plan.split,
                proportion=s.proportion if train else None,
                repeat=s.repeat if train else None,
                choose=s.choose if train else None,
            )
            for s in plan.streams.values()
        ]

    with machine_turn():  # no other job on this machine picks a prefix between our ranks' scans
        clean_stale_shared_memory()
        dataset = _with_shared_memory_retry(
            lambda: PackedTokenDataset(
                eot_id=plan.info.eot_id,
                pad_id=plan.info.pad_id,
                vocab_size=plan.info.vocab_size,
                mix_id=plan.mix_id,
                streams=streams(),
                epoch_size=cfg.epoch_size if train else None,
                predownload=cfg.predownload,
                cache_limit=cfg.cache_limit,
                download_timeout=cfg.download_timeout,
                validate_hash=cfg.validate_hash,
                sampling_method=cfg.sampling_method,
                num_canonical_nodes=cfg.num_canonical_nodes,
                batch_size=device_batch_size,
                shuffle=cfg.shuffle and train,
                shuffle_algo=cfg.shuffle_algo,
                shuffle_seed=cfg.shuffle_seed,
                shuffle_block_size=cfg.shuffle_block_size,
            )
        )
    remote = {
        name: Path(st.local) / st.split / "index.json"
        for (name, s), st in zip(plan.streams.items(), dataset.streams)
        if s.remote is not None
    }
    dataset.seq_len = check_streams(remote, plan.info, plan.tokenizer) if remote else plan.seq_len
    if remote and plan.seq_len and dataset.seq_len != plan.seq_len:
        raise ConfigError(
            f"streams have different seq_len (local {plan.seq_len}, remote {dataset.seq_len}); "
            "convert them all with one --seq-len"
        )
    return dataset


def build_dataset(
    cfg: DataConfig, tokenizer: str | Path, device_batch_size: int, split: str = "train"
) -> PackedTokenDataset:
    """The dataset of one split of ``cfg.phase``, planned and built in one call (for a caller with
    no run plan: evaluation, tests, benchmarks)."""
    info = tokenizer_info(load_tokenizer(tokenizer))
    plan = plan_split(cfg, phase_streams_of(cfg), tokenizer, info, split)
    return build_split_dataset(cfg, plan, device_batch_size)


def _with_shared_memory_retry(
    build: Callable[[], PackedTokenDataset], attempts: int = 5
) -> PackedTokenDataset:
    """``build()``, retried when another job on this machine took the same shared-memory name first.

    Streaming picks the first free shared-memory prefix and then creates it. Jobs of this
    repository take turns (``machine_turn``), but a Streaming job that does not (another program
    on the machine) can still take our prefix between the two steps. Several ranks of one job
    wait for each other at barriers inside Streaming, so only a single process retries.
    """
    for attempt in range(attempts):
        try:
            return build()
        except FileExistsError:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.5))
    raise AssertionError("unreachable")


def check_streams(index_paths: dict[str, Path], info: TokenizerInfo, tokenizer: str | Path) -> int:
    """The streams' common sequence length; every stream made with another tokenizer, missing, or of
    another sequence length is reported, all at once, in one ``ConfigError``."""
    problems, seq_lens = [], {}
    for name, index_path in index_paths.items():
        try:
            meta = read_shard_meta(index_path, name)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(str(exc))
            continue
        if meta.tokenizer.fingerprint != info.fingerprint or meta.tokenizer.vocab_size != info.vocab_size:
            problems.append(
                f"tokenizer mismatch: stream {name!r} ({index_path}) was converted with tokenizer "
                f"{meta.tokenizer.fingerprint[:12]} (vocab {meta.tokenizer.vocab_size}), but this run uses {tokenizer} "
                f"({info.fingerprint[:12]}, vocab {info.vocab_size}); re-convert the stream with "
                f"--tokenizer {tokenizer} or run with the tokenizer the shards were made with"
            )
        seq_lens[name] = meta.seq_len
        shards = json.loads(index_path.read_text())["shards"]
        if shards and CHECKSUM_COLUMN not in shards[0]["column_names"]:
            warnings.warn(
                f"stream {name!r} ({index_path}) has no per-sample checksums (converted by an older "
                "data.convert): its samples are read unverified; re-convert it to check them on every read",
                stacklevel=2,
            )
    if len(set(seq_lens.values())) > 1:
        problems.append(f"streams have different seq_len {seq_lens}; convert them all with one --seq-len")
    if problems:
        raise ConfigError(*problems)
    return next(iter(seq_lens.values()), 0)


def shard_file_problems(stream_name: str, index_path: Path, part: int = 0, parts: int = 1) -> list[str]:
    """Every shard file of a local stream's split is there, at the size its index.json records.

    Only the shards ``i`` with ``i % parts == part``: the ranks of one node split the work (each
    node checks its own copy in full) and share their verdicts (``common.distributed.agree``).
    A shard is there when its unpacked ``.mds`` or its compressed file is; each one present must
    have its recorded size (a truncated copy is caught here, a changed byte by the hashes and
    per-sample checksums when it is read).
    """
    folder = index_path.parent
    problems = []
    for i, shard in enumerate(json.loads(index_path.read_text())["shards"]):
        if i % parts != part:
            continue
        files = [shard["raw_data"]] + ([shard["zip_data"]] if shard.get("zip_data") else [])
        present = [
            (meta, folder / meta["basename"]) for meta in files if (folder / meta["basename"]).is_file()
        ]
        if not present:
            problems.append(
                f"stream {stream_name!r}: shard file {folder / files[-1]['basename']} (listed in {index_path}) is "
                "missing; the stream is local, with no remote copy to download it from: restore the file, or "
                f"re-run data.convert for this stream (--out {folder.parent})"
            )
        for meta, path in present:
            size = path.stat().st_size
            if size != int(meta["bytes"]):
                problems.append(
                    f"stream {stream_name!r}: shard file {path} is corrupt: {size} bytes where {index_path} records "
                    f"{meta['bytes']}; "
                    + (
                        "delete it to unpack it again from the compressed file"
                        if meta is shard["raw_data"] and len(present) == 2
                        else f"re-run data.convert for this stream (--out {folder.parent})"
                    )
                )
    return problems


def build_split_loader(cfg: DataConfig, plan: SplitPlan, device_batch_size: int) -> DataSpec:
    """A Composer DataSpec of dict batches (input_ids, labels, position_ids: int64, B x L) over a
    planned split.

    Composer finds the dataset through the DataSpec and saves/loads its resumption state.
    """
    if device_batch_size < 1:
        raise ConfigError(f"device_batch_size={device_batch_size} must be >= 1")
    dataset = build_split_dataset(cfg, plan, device_batch_size)
    loader = DataLoader(
        dataset,
        batch_size=device_batch_size,
        num_workers=cfg.num_workers,
        drop_last=cfg.drop_last and plan.split == "train",
        persistent_workers=cfg.num_workers > 0,
    )
    return DataSpec(loader, get_num_tokens_in_batch=lambda batch: int(batch["input_ids"].numel()))


def build_dataloader(
    cfg: DataConfig, tokenizer: str | Path, device_batch_size: int, split: str = "train"
) -> DataSpec:
    """``build_split_loader`` planned and built in one call (for a caller with no run plan)."""
    if device_batch_size < 1:
        raise ConfigError(f"device_batch_size={device_batch_size} must be >= 1")
    info = tokenizer_info(load_tokenizer(tokenizer))
    plan = plan_split(cfg, phase_streams_of(cfg), tokenizer, info, split)
    return build_split_loader(cfg, plan, device_batch_size)
