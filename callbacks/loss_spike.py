"""Detect training-loss spikes and roll the weights back to the last good checkpoint, skipping data.

The remedy of PaLM (Chowdhery et al. 2022, section 5.1) and OPT (Zhang et al. 2022): when the loss
spikes, restart from a checkpoint taken before the spike and let the data that came with it go by.
Here the rollback happens inside the running Trainer, at ``Event.BATCH_END`` of the spiking batch:

* restored: model weights and optimizer state (AdamW moments, step counts), read with Composer's
  ``checkpoint.load_checkpoint`` from a checkpoint that Composer's ``CheckpointSaver`` wrote in this
  run, so monolithic and FSDP-sharded checkpoints both work;
* kept: the timestamp, the data position (the dataloader keeps going, so the batches between the
  checkpoint and the spike are skipped, not replayed), the schedulers and the optimizer's
  hyperparameters (``lr`` etc. in ``param_groups``: a function of the timestamp), metrics,
  callbacks' and algorithms' state, RNG.

Detection rule (``SpikeDetector``). Over the last ``window`` accepted losses, once at least
``warmup_batches`` of them exist, a loss ``x`` is a spike when

    x > mean + max(threshold_std * std, min_rel_increase * |mean|)        (std: population, ddof 0)

and a non-finite loss is always a spike (also before ``warmup_batches``). Both margins are above the
mean: a spike is a rise over recent history. The decay phase of WSD only lowers the loss, so every
loss there is below or near the window mean and the rule cannot fire on it; ``min_rel_increase``
keeps it from firing on noise when the window is flat (std near 0). Spiking losses never enter the
window. The loss is Composer's ``state.total_loss_dict['loss/train/total']``, already all-reduced
(mean over ranks) by the Trainer, so every rank sees the same number and takes the same decision;
the checkpoint to restore is chosen on rank 0 and broadcast.

Which checkpoint. A checkpoint saved at the boundary ``c`` holds the weights that compute the loss
of the batch that starts at ``c``. It is "good" once that loss was accepted; the rollback restores
the newest good checkpoint in ``CheckpointSaver.saved_checkpoints`` (rotated files excluded,
``weights_only`` savers ignored). A checkpoint saved right before the spike is therefore not used:
its weights produced the spike.

Retries. ``max_retries`` rollbacks in a row, with fewer than ``recovery_batches`` accepted losses
after the last one, and then another spike: the run stops with ``SpikesPersist`` (a ``RunStopped``:
the CLI prints one ``stopped:`` line and exits 3) naming the audit file. A spike before any good checkpoint exists is logged as a warning, recorded in the audit and
training continues (the weights are not restored); it counts as a failed retry, so a run that goes
to NaN before its first checkpoint still stops after ``max_retries + 1`` spikes.

Audit. Every event is one JSON line appended to ``audit_file`` by rank 0 (one ``write``, then flush
and fsync): ``event`` ('rollback' | 'no_checkpoint' | 'give_up'), the spike's ``loss``, ``window``
statistics, the ``checkpoint`` restored and its timestamp, and ``skipped``: the half-open batch,
sample and token ranges ``[checkpoint, now)`` whose updates were discarded.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State, Timestamp
from composer.loggers import Logger
from composer.utils import checkpoint, dist, format_name_with_dist

from common.cli import RunStopped
from common.distributed import broadcast_object

log = logging.getLogger(__name__)

LOSS_KEY = "loss/train/total"
_RESTORED_KEYS = ("model", "optimizers")


class SpikesPersist(RunStopped):
    """The loss kept spiking after ``max_retries`` rollbacks: the run stops (exit 3 from the CLI)."""


@dataclass(frozen=True)
class SpikeVerdict:
    """The detector's decision on one loss, with the window statistics it was judged against."""

    spike: bool
    loss: float
    n: int
    mean: float
    std: float
    threshold: float


class SpikeDetector:
    """The spike rule over a moving window of accepted losses (see the module docstring)."""

    def __init__(
        self,
        window: int = 50,
        threshold_std: float = 4.0,
        min_rel_increase: float = 0.1,
        warmup_batches: int = 50,
    ) -> None:
        if window < 2:
            raise ValueError(f"loss spike: window={window} must be >= 2 (a std needs two losses)")
        if not 2 <= warmup_batches <= window:
            raise ValueError(
                f"loss spike: warmup_batches={warmup_batches} must be in [2, window={window}]; it is the number "
                "of accepted losses the window needs before the rule is armed"
            )
        if threshold_std < 0 or min_rel_increase < 0:
            raise ValueError(
                f"loss spike: threshold_std={threshold_std} and min_rel_increase={min_rel_increase} must be >= 0"
            )
        self.window = window
        self.threshold_std = threshold_std
        self.min_rel_increase = min_rel_increase
        self.warmup_batches = warmup_batches
        self.history: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> SpikeVerdict:
        """Judge ``loss`` against the window; accepted losses join it, spikes do not."""
        n = len(self.history)
        mean = math.fsum(self.history) / n if n else math.nan
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.history) / n) if n else math.nan
        threshold = mean + max(self.threshold_std * std, self.min_rel_increase * abs(mean)) if n else math.inf
        armed = n >= self.warmup_batches
        spike = not math.isfinite(loss) or (armed and loss > threshold)
        if not spike:
            self.history.append(loss)
        return SpikeVerdict(spike, loss, n, mean, std, threshold if armed else math.inf)


def _keep_model_and_optimizers(state_dict: dict[str, Any]) -> None:
    """``ignore_keys`` for ``load_checkpoint``: drop everything but the weights and the optimizer state."""
    for key in [k for k in state_dict if k != "state"]:
        del state_dict[key]
    inner = state_dict.get("state", {})
    for key in [k for k in inner if k not in _RESTORED_KEYS]:
        del inner[key]


def _json_number(x: float) -> float | str:
    """A float as JSON allows it: non-finite values ('nan', 'inf') as strings."""
    return x if math.isfinite(x) else str(x)


def _time_range(start: Timestamp, end: Timestamp) -> dict[str, list[int]]:
    return {
        unit: [int(getattr(start, unit).value), int(getattr(end, unit).value)]
        for unit in ("batch", "sample", "token")
    }


class LossSpikeRollback(Callback):
    """Roll back to the last good checkpoint on a loss spike; the data in between is skipped.

    Needs a ``CheckpointSaver`` in the run (the Trainer's ``save_folder``/``save_interval``): it is the
    source of the checkpoints to restore. Put ``save_interval`` a few hundred batches apart at most;
    a spike can only go back to a checkpoint of this run.

    Args:
        window: Number of recent accepted losses the rule looks at.
        threshold_std: ``k`` in ``mean + max(k * std, rel * |mean|)``.
        min_rel_increase: ``rel`` in the same rule, a fraction of the window mean.
        warmup_batches: Accepted losses needed before the rule is armed (non-finite losses always count).
        max_retries: Rollbacks in a row without recovery before the run stops with ``SpikesPersist``.
        recovery_batches: Accepted losses after a rollback that count as a recovery (resets the retries).
        audit_file: JSON-lines file of all rollbacks; ``None``: ``loss_spikes.jsonl`` in the first
            CheckpointSaver's folder. ``{run_name}`` is filled in.
    """

    def __init__(
        self,
        window: int = 50,
        threshold_std: float = 4.0,
        min_rel_increase: float = 0.1,
        warmup_batches: int = 50,
        max_retries: int = 3,
        recovery_batches: int = 20,
        audit_file: str | None = None,
    ) -> None:
        if max_retries < 1:
            raise ValueError(f"loss spike: max_retries={max_retries} must be >= 1")
        if recovery_batches < 1:
            raise ValueError(f"loss spike: recovery_batches={recovery_batches} must be >= 1")
        self.detector = SpikeDetector(window, threshold_std, min_rel_increase, warmup_batches)
        self.max_retries = max_retries
        self.recovery_batches = recovery_batches
        self.audit_file = audit_file
        self.retries = 0
        self.accepted_since_rollback = 0
        self.rollbacks = 0
        self._good: dict[str, Timestamp] = {}  # rank 0: restorable checkpoint path -> its timestamp
        self._audit_path: str | None = None

    # Saved in every Composer checkpoint, so a resumed run starts with an armed window.
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.detector.history),
            "retries": self.retries,
            "accepted_since_rollback": self.accepted_since_rollback,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.history.clear()
        self.detector.history.extend(state["history"])
        self.retries = state["retries"]
        self.accepted_since_rollback = state["accepted_since_rollback"]
        self.rollbacks = state["rollbacks"]

    def _savers(self, state: State) -> list[CheckpointSaver]:
        return [cb for cb in state.callbacks if isinstance(cb, CheckpointSaver) and not cb.weights_only]

    def fit_start(self, state: State, logger: Logger) -> None:
        savers = self._savers(state)
        if not savers:
            raise ValueError(
                "LossSpikeRollback restores checkpoints written by Composer's CheckpointSaver, and this run has "
                "none that saves the optimizer; set save_folder and save_interval (and save_weights_only: false)"
            )
        audit = self.audit_file or os.path.join(savers[0].folder, "loss_spikes.jsonl")
        self._audit_path = os.path.abspath(format_name_with_dist(audit, state.run_name))
        self._good.clear()

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.total_loss_dict.get(LOSS_KEY)
        if loss is None or state.previous_timestamp is None:
            return
        verdict = self.detector.check(float(loss))
        if not verdict.spike:
            self._mark_good(state)
            self.accepted_since_rollback += 1
            if self.accepted_since_rollback >= self.recovery_batches:
                self.retries = 0
            return
        self._on_spike(state, logger, verdict)

    def _mark_good(self, state: State) -> None:
        """The loss just accepted was computed with the weights saved at ``previous_timestamp``, if any."""
        if dist.get_global_rank() != 0:
            return
        assert state.previous_timestamp is not None
        existing = set()
        for saver in self._savers(state):
            for path in saver.saved_checkpoints:
                existing.add(path)
                ts = saver.all_saved_checkpoints_to_timestamp.get(path)
                if ts is not None and ts.batch == state.previous_timestamp.batch:
                    self._good[path] = ts
        for path in [p for p in self._good if p not in existing]:  # rotated away by num_checkpoints_to_keep
            del self._good[path]

    def _on_spike(self, state: State, logger: Logger, verdict: SpikeVerdict) -> None:
        assert state.previous_timestamp is not None
        record: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "spike_batch": int(state.previous_timestamp.batch.value),
            "timestamp": _time_range(state.previous_timestamp, state.timestamp),
            "loss": _json_number(verdict.loss),
            "window": {
                "n": verdict.n,
                "mean": _json_number(verdict.mean),
                "std": _json_number(verdict.std),
                "threshold": _json_number(verdict.threshold),
            },
            "retry": self.retries + 1,
            "max_retries": self.max_retries,
        }
        if self.retries >= self.max_retries:
            self._audit({"event": "give_up", **record})
            raise SpikesPersist(
                f"training stopped: loss {verdict.loss:.6g} at batch {record['spike_batch']} is a spike again "
                f"after {self.retries} rollbacks without recovery (callbacks.loss_spike.max_retries="
                f"{self.max_retries}); every rollback is recorded in {self._audit_path}. The last good "
                "checkpoint is kept; lower optimizer.lr or lengthen the warmup, check the data of the batches "
                "in the audit, then run the same command again"
            )
        self.retries += 1
        self.accepted_since_rollback = 0

        choice: tuple[str | None, dict[str, Any] | None] = (None, None)
        if dist.get_global_rank() == 0 and self._good:
            path, ts = max(self._good.items(), key=lambda item: item[1].batch.value)
            load_path = str(Path(path).parent) if state.fsdp_sharded_state_dict_enabled else path
            choice = (load_path, ts.state_dict())
        load_path, ts_state = broadcast_object(choice)

        if load_path is None:
            log.warning(
                "LossSpikeRollback: loss %.6g at batch %d is a spike (threshold %.6g) but no good checkpoint exists "
                "yet; training goes on without a rollback (retry %d of %d)",
                verdict.loss,
                record["spike_batch"],
                verdict.threshold,
                self.retries,
                self.max_retries,
            )
            self._audit({"event": "no_checkpoint", **record})
            return

        ckpt_ts = Timestamp()
        ckpt_ts.load_state_dict(ts_state)
        self._restore(state, logger, load_path)
        self.rollbacks += 1
        skipped = _time_range(ckpt_ts, state.timestamp)
        self._audit({"event": "rollback", **record, "checkpoint": load_path, "skipped": skipped})
        log.warning(
            "LossSpikeRollback: loss %.6g at batch %d exceeds %.6g (window mean %.6g, std %.3g); restored %s "
            "(batch %d) and skipped the updates of batches [%d, %d); retry %d of %d",
            verdict.loss,
            record["spike_batch"],
            verdict.threshold,
            verdict.mean,
            verdict.std,
            load_path,
            skipped["batch"][0],
            *skipped["batch"],
            self.retries,
            self.max_retries,
        )
        logger.log_metrics(
            {
                "loss_spike/rollbacks": self.rollbacks,
                "loss_spike/skipped_batches": skipped["batch"][1] - skipped["batch"][0],
            }
        )

    def _restore(self, state: State, logger: Logger, load_path: str) -> None:
        """Load weights and optimizer state; keep the optimizer's current (scheduled) hyperparameters."""
        hyper = [
            [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            for opt in state.optimizers
        ]
        checkpoint.load_checkpoint(
            load_path, state, logger, progress_bar=False, ignore_keys=_keep_model_and_optimizers
        )
        for opt, groups in zip(state.optimizers, hyper):
            for group, saved in zip(opt.param_groups, groups):
                group.update(saved)
        for opt in state.optimizers:
            opt.zero_grad(set_to_none=True)

    def _audit(self, record: dict[str, Any]) -> None:
        if dist.get_global_rank() != 0:
            return
        assert self._audit_path is not None, "set at fit_start"
        os.makedirs(os.path.dirname(self._audit_path), exist_ok=True)
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self._audit_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
