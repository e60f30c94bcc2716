"""Batch-size ramp-up: the global batch grows linearly in tokens, in whole micro-batches.

The Mambaoutai ablations ("Passing the Torch", section 4) use "a batch size of 2 million tokens,
linearly ramped up over the first 1B tokens". Three pieces:

* ``BatchRampSchedule``: the rule, a pure function of the tokens seen so far.
* ``RampedBatches``: wraps the train ``DataLoader`` (which yields fixed-size per-rank
  micro-batches) and concatenates ``k`` of them into one per-rank batch, ``k`` following the
  schedule. Composer splits each batch back into micro-batches of ``device_train_microbatch_size``
  and averages the gradient over the whole (variable) batch.
* ``BatchRampup``: the callback that positions the wrapper from Composer's timestamp when a run
  starts or resumes, checks that both agree before every batch, and logs the batch size.

Rounding rule. One unit is one micro-batch on every rank: ``unit = seq_len * device_microbatch_size
* world_size`` tokens. With ``t`` the tokens seen before a batch (``t = samples seen * seq_len``)::

    b(t) = start + (target - start) * min(t, ramp) / ramp          (tokens; b = target if ramp = 0)
    k(t) = max(1, floor(b(t) / unit))                               micro-batches per rank
    global batch = k(t) * device_microbatch_size * world_size       samples

computed in exact integers, so a resumed run takes the same sizes bit for bit. Rounding down
(Megatron-LM's ramp-up rule) keeps the batch at or below the linear ramp; ``target`` must be a whole
number of units so that the ramp ends exactly on it. The ramp is quantised to whole units: with
seq 4096, micro-batch 4 and 64 ranks one unit is 1M tokens, so a ramp to 2M has two sizes only.

Tokens are counted as sample slots (samples x seq_len), which is Composer's token counter when
``get_num_tokens_in_batch`` counts ``input_ids.numel()`` (``data.loader`` and Composer's default).

Resumption. Composer saves ``dataset.state_dict(timestamp.sample_in_epoch, from_beginning=True)``
for a ``DataLoader``'s dataset (``State._dataset_of`` only looks inside a
``torch.utils.data.DataLoader``, which is why ``RampedBatches`` is one) and on resume calls
``dataset.load_state_dict``. The wrapper hands Composer exactly the samples it read, so Composer's
sample count is exactly the samples consumed and a ``StreamingDataset`` restarts at the next
unread sample (Streaming interleaves samples over ranks one by one, so with equal per-rank batches
"first N global samples" is "first N / world samples of each rank"). The wrapper then starts
counting at ``timestamp.sample``. A dataset without ``state_dict`` (map-style) is instead
re-iterated from the start of the epoch and the first ``batch_in_epoch`` batches skipped
(Composer's ``spin_dataloaders=True``, the default); the wrapper then starts counting at the
epoch's first sample so the skipped batches have their original sizes. With
``spin_dataloaders=False`` such a run cannot resume its data position, and ``BatchRampup``
refuses it instead of training on shifted batches.

Pre-fetching. The wrapper keeps one iterator over the inner ``DataLoader`` for the whole epoch
and pulls micro-batches on demand, so worker processes (``num_workers > 0``) may read ahead
without loss: what they pre-read is the next batch's start. Read-ahead samples are not counted
by Composer, so a checkpoint resumes before them. For a ``StreamingDataset`` with workers, its
``batch_size`` must equal the ``DataLoader``'s (the micro-batch size), as ``data.loader`` does,
so that worker interleaving keeps the per-rank sample order.

The end of an epoch gives a last, smaller batch with the micro-batches that are left (no
sample is dropped); the ramp continues in the next epoch. ``len()`` is not defined (the number
of batches depends on where the ramp is), so ``max_duration`` must be in tokens, samples or
batches, not epochs (Composer refuses epochs for a loader without a length).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import islice

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.data import DataLoader, IterableDataset


@dataclass
class BatchRampupConfig:
    """The ``batch_rampup`` section of a recipe: grow the global batch linearly in tokens.

    The paper ramps to its 2M-token batch (the recipe's ``global_train_batch_size``) over the
    first 1B tokens; it gives no start size. Give the scheduler's warmup in tokens when the ramp
    is on: batches no longer map to a fixed number of tokens.
    """

    start_batch_tokens: int = 262144  # global batch at the start (rounded down to whole micro-batches)
    ramp_tokens: int = 1_000_000_000  # tokens over which it grows to the target; 0 = no ramp

    def schedule(
        self, target_batch_tokens: int, seq_len: int, device_microbatch_size: int, world_size: int
    ) -> BatchRampSchedule:
        return BatchRampSchedule(
            self.start_batch_tokens,
            target_batch_tokens,
            self.ramp_tokens,
            seq_len,
            device_microbatch_size,
            world_size,
        )


@dataclass(frozen=True)
class BatchRampSchedule:
    """Global batch size as a function of the tokens seen so far (see the module docstring).

    Args:
        start_batch_tokens: Global batch (tokens) at the start; rounded down to whole units, at
            least one micro-batch per rank.
        target_batch_tokens: Global batch (tokens) from ``ramp_tokens`` on; a multiple of
            ``seq_len * device_microbatch_size * world_size``.
        ramp_tokens: Tokens over which the batch grows linearly; 0 = the target from the start.
        seq_len: Tokens per sample.
        device_microbatch_size: Samples per micro-batch on one rank (the train ``DataLoader``'s
            ``batch_size``; normally Composer's ``device_train_microbatch_size``).
        world_size: Number of ranks.
    """

    start_batch_tokens: int
    target_batch_tokens: int
    ramp_tokens: int
    seq_len: int
    device_microbatch_size: int
    world_size: int = 1

    def __post_init__(self) -> None:
        for key in ("seq_len", "device_microbatch_size", "world_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"batch_rampup: {key}={value!r} must be an integer >= 1")
        unit = self.unit_tokens
        if self.target_batch_tokens < 1 or self.target_batch_tokens % unit:
            lower = max(unit, self.target_batch_tokens // unit * unit)
            raise ValueError(
                f"batch_rampup.target_batch_tokens={self.target_batch_tokens} must be a positive multiple of "
                f"seq_len * device_microbatch_size * world_size = {self.seq_len} * "
                f"{self.device_microbatch_size} * {self.world_size} = {unit}: set it to {lower} or "
                f"{lower + unit}"
            )
        if not 1 <= self.start_batch_tokens <= self.target_batch_tokens:
            raise ValueError(
                f"batch_rampup.start_batch_tokens={self.start_batch_tokens} must be in [1, "
                f"target_batch_tokens={self.target_batch_tokens}]; values below {unit} (one micro-batch "
                "per rank) start at one micro-batch"
            )
        if self.ramp_tokens < 0:
            raise ValueError(
                f"batch_rampup.ramp_tokens={self.ramp_tokens} must be >= 0 (0 = the target batch from the start)"
            )

    @property
    def unit_tokens(self) -> int:
        """Tokens in one micro-batch on every rank: the step of the ramp."""
        return self.seq_len * self.device_microbatch_size * self.world_size

    @property
    def target_microbatches(self) -> int:
        """Micro-batches per rank once the ramp is over."""
        return self.target_batch_tokens // self.unit_tokens

    def per_rank_microbatches(self, tokens_seen: int) -> int:
        """``k(t)``: micro-batches per rank in the batch that starts after ``tokens_seen`` tokens."""
        if tokens_seen < 0:
            raise ValueError(f"batch_rampup: tokens_seen={tokens_seen} must be >= 0")
        if tokens_seen >= self.ramp_tokens:
            return self.target_microbatches
        numerator = (
            self.start_batch_tokens * self.ramp_tokens
            + (self.target_batch_tokens - self.start_batch_tokens) * tokens_seen
        )
        return max(1, numerator // (self.ramp_tokens * self.unit_tokens))

    def global_batch_size(self, tokens_seen: int) -> int:
        """Samples in the global batch that starts after ``tokens_seen`` tokens."""
        return self.per_rank_microbatches(tokens_seen) * self.device_microbatch_size * self.world_size

    def plan(self, until_tokens: int) -> list[int]:
        """Global batch sizes (samples) of the steps that train the first ``until_tokens`` tokens.

        Useful to convert token budgets into optimizer steps (e.g. a warmup in steps).
        """
        sizes, tokens = [], 0
        while tokens < until_tokens:
            sizes.append(self.global_batch_size(tokens))
            tokens += sizes[-1] * self.seq_len
        return sizes


def _concat(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    first = parts[0]
    if not isinstance(first, Mapping) or not all(isinstance(v, torch.Tensor) for v in first.values()):
        raise TypeError(
            f"RampedBatches: the data loader must yield dicts of tensors, got {type(first).__name__}"
        )
    return {key: torch.cat([part[key] for part in parts]) for key in first}


class RampedBatches(DataLoader):
    """A train loader whose per-rank batches are ``k(t)`` concatenated micro-batches of ``loader``.

    It is a ``DataLoader`` so that Composer finds ``.dataset`` (the wrapped loader's) and saves and
    restores its ``state_dict``, and ``.sampler`` (a ``DistributedSampler`` gets ``set_epoch``).
    It is iterated only through its own ``__iter__``; its ``DataLoader`` machinery is unused.

    Args:
        loader: Yields per-rank micro-batches, dicts of tensors with ``device_microbatch_size`` rows
            (the last one of an epoch may be smaller).
        schedule: The ramp.
    """

    def __init__(self, loader: DataLoader, schedule: BatchRampSchedule) -> None:
        if loader.batch_size is not None and loader.batch_size != schedule.device_microbatch_size:
            raise ValueError(
                f"RampedBatches: the data loader's batch_size={loader.batch_size} must equal "
                f"batch_rampup device_microbatch_size={schedule.device_microbatch_size}: build the loader with "
                "the micro-batch size (the ramp concatenates micro-batches)"
            )
        iterable = isinstance(loader.dataset, IterableDataset)
        super().__init__(loader.dataset, batch_size=None, sampler=None if iterable else loader.sampler)
        self.loader = loader
        self.schedule = schedule
        # Global samples seen before the first batch of the next iteration (epoch).
        self.start_sample = 0
        # Global samples seen before the batch most recently yielded (None before the first).
        self.batch_start_sample: int | None = None

    def __len__(self) -> int:
        # TypeError is what Composer (State.dataloader_len) treats as "length unknown".
        raise TypeError(
            "RampedBatches has no length (the number of batches depends on the ramp): set max_duration in "
            "tokens, samples or batches"
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        seen = self.start_sample
        micro = iter(self.loader)
        while True:
            k = self.schedule.per_rank_microbatches(seen * self.schedule.seq_len)
            parts = list(islice(micro, k))
            if not parts:
                break
            batch = _concat(parts)
            self.batch_start_sample = seen
            seen += len(next(iter(batch.values()))) * self.schedule.world_size
            yield batch
            if len(parts) < k:
                break
        self.start_sample = seen


class BatchRampup(Callback):
    """Keeps ``RampedBatches`` at Composer's position: set on fit start and epoch start, checked every batch.

    Add it to the Trainer's callbacks whenever the train loader is a ``RampedBatches``. Logs
    ``batch_rampup/global_batch_size`` (samples) and ``batch_rampup/microbatches_per_rank``.
    """

    def __init__(self) -> None:
        self._warned_tokens = False

    def _loader(self, state: State) -> RampedBatches:
        loader = state.dataloader
        if not isinstance(loader, RampedBatches):
            raise ValueError(
                f"BatchRampup: the train dataloader is a {type(loader).__name__}, not a RampedBatches: wrap it "
                "with RampedBatches(loader, schedule), or remove the BatchRampup callback"
            )
        return loader

    def _set_start(self, state: State) -> None:
        loader = self._loader(state)
        ts = state.timestamp
        if state.dataset_resumption.get("train"):
            # The dataset restarts where the checkpoint left it (its load_state_dict).
            loader.start_sample = int(ts.sample)
        else:
            # The data restarts at the epoch's start; Composer spins through batch_in_epoch batches.
            loader.start_sample = int(ts.sample) - int(ts.sample_in_epoch)

    def fit_start(self, state: State, logger: Logger) -> None:
        loader = self._loader(state)
        world = dist.get_world_size()
        if world != loader.schedule.world_size:
            raise ValueError(
                f"BatchRampup: the schedule's world_size={loader.schedule.world_size} but the run has "
                f"{world} ranks: build BatchRampSchedule with world_size={world}"
            )
        if state.device_train_microbatch_size != loader.schedule.device_microbatch_size:
            warnings.warn(
                f"BatchRampup: device_train_microbatch_size={state.device_train_microbatch_size} differs from "
                f"the ramp's device_microbatch_size={loader.schedule.device_microbatch_size}; batches are "
                "still exact, but Composer re-splits them into micro-batches of the former",
                stacklevel=2,
            )
        self._set_start(state)

    def epoch_start(self, state: State, logger: Logger) -> None:
        self._set_start(state)

    def after_dataloader(self, state: State, logger: Logger) -> None:
        loader = self._loader(state)
        ts = state.timestamp
        if loader.batch_start_sample != int(ts.sample):
            raise RuntimeError(
                f"BatchRampup: this batch starts at global sample {loader.batch_start_sample} of the ramp but "
                f"Composer's timestamp is at sample {int(ts.sample)}, so batch sizes and data would not match an "
                "uninterrupted run. Likely causes: resuming a dataset without state_dict (map-style) with "
                "spin_dataloaders=False (keep the Trainer's spin_dataloaders=True); a get_num_samples_in_batch "
                "that does not count the batch's rows; ranks yielding different numbers of samples"
            )
        seq_len = loader.schedule.seq_len
        if not self._warned_tokens and int(ts.token) != int(ts.sample) * seq_len:
            self._warned_tokens = True
            warnings.warn(
                f"BatchRampup: Composer counted {int(ts.token)} tokens but the ramp counts samples x seq_len = "
                f"{int(ts.sample) * seq_len}; the ramp follows the latter",
                stacklevel=2,
            )
        rows = len(next(iter(state.batch.values())))  # k(t) micro-batches; fewer at an epoch's end
        mb = loader.schedule.device_microbatch_size
        logger.log_metrics(
            {
                "batch_rampup/global_batch_size": rows * dist.get_world_size(),
                "batch_rampup/microbatches_per_rank": -(-rows // mb),
            }
        )
