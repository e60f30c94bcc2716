"""Save one full checkpoint when the WSD stable phase ends: the start point of any later decay phase.

With a warmup-stable-decay schedule the weights at the end of the stable phase are the branch
point of the recipe: a decay phase (``DecayPhaseScheduler``) can be run from them at any later
time, for any length, on any data mixture (Hu et al. 2024; Hägele et al. 2024). This callback
writes that checkpoint once, with Composer's own ``checkpoint.save_checkpoint`` (weights,
optimizer, schedulers, timestamp, dataset state, callbacks, RNG), so ``Trainer(load_path=...)``
reads it like any other Composer checkpoint, monolithic or FSDP-sharded.

Which batch. The stable phase ends at ``T_s = scheduler.stable_end(state)`` (found in
``state.schedulers``; see ``_find_phased_scheduler``). The checkpoint is taken at the first batch
boundary whose trained time reaches ``T_s``: at ``Event.BATCH_CHECKPOINT`` of the batch for which
``previous_timestamp < T_s <= timestamp`` (in ``T_s``'s unit). With ``T_s = S`` batches that is the
boundary after ``S`` trained batches, file ``pre-decay-baS.pt``, timestamp ``S`` batches. Composer
evaluates the scheduler after each step and before it advances the timestamp, so batch ``n`` trains
with ``f(n - 1)``: every one of the ``S`` batches in the checkpoint trained at ``f(<= S - 2)``, the
peak lr (or the warmup), and the optimizer's lr stored in it is ``f(S - 1)``, the peak lr. The
decayed lr ``f(S + k)`` is first used by batch ``S + k + 1``. With ``T_s`` in tokens or samples the
boundary is the first one at or after ``T_s``.

Resumption. The rule looks at the crossing, not at a flag, so a run resumed after the boundary never
writes it (its timestamps are all past ``T_s``) and a run resumed before it writes it when it gets
there. The path written is also kept in the callback's state (saved in every Composer checkpoint).
One gap: if a run dies after the regular checkpoint of boundary ``S`` and before this callback
wrote its file in the same event, a resume from that checkpoint starts at ``S`` and never crosses
``T_s`` again; a warning at fit start names the missing file.

Atomic writes. Rank 0 writes the monolithic file to a hidden temporary name in the same folder,
fsyncs it and renames it (``os.replace``); a sharded checkpoint is a directory of per-rank files,
written under a hidden temporary directory and renamed by rank 0 after all ranks finished. A crash
mid-write leaves only a ``.tmp-*`` entry, never a truncated ``pre-decay-*``. Local folders only
(Composer's ``CheckpointSaver`` uploads its own checkpoints; this one is not uploaded).

Decay-phase workflow: a new run with ``load_path=<folder>/pre-decay-baS.pt`` and
``load_ignore_keys=['state/timestamp', 'state/dataset_state', 'state/schedulers', 'state/callbacks']``
restores the weights and the AdamW state (moments and step counts) and starts its own timestamp,
schedule and data at 0 (``DecayPhaseScheduler(t_start='0ba')``; tested). Loading it whole instead
continues the same run, data position included, with ``DecayPhaseScheduler(t_start='Sba')``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from composer.core import Callback, State, Time
from composer.loggers import Logger
from composer.utils import checkpoint, dist, format_name_with_dist, format_name_with_dist_and_time
from torch.optim.lr_scheduler import LambdaLR

from callbacks.schedulers import PhasedScheduler

log = logging.getLogger(__name__)


def _find_phased_scheduler(state: State) -> tuple[PhasedScheduler, float]:
    """The ``PhasedScheduler`` the Trainer was given and its scale schedule ratio.

    Composer 0.32.1's ``compile_composer_scheduler`` wraps a ``ComposerScheduler`` in a ``LambdaLR``
    whose ``lr_lambda`` closes over ``scheduler`` and ``ssr``; the closure is the only place the
    original object and the ratio live after ``Trainer.__init__``.
    """
    found: list[tuple[PhasedScheduler, float]] = []
    for lr_scheduler in state.schedulers:
        if not isinstance(lr_scheduler, LambdaLR):
            continue
        for fn in lr_scheduler.lr_lambdas:
            cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
            candidate = (cells.get("scheduler"), float(cells.get("ssr", 1.0)))
            # One LambdaLR per parameter group, all closing over the same schedule.
            if isinstance(candidate[0], PhasedScheduler) and not any(candidate[0] is f[0] for f in found):
                found.append(candidate)
    if len(found) != 1:
        raise ValueError(
            f"PreDecayCheckpoint needs exactly one schedule from callbacks/schedulers.py (e.g. 'wsd') in the "
            f"Trainer's schedulers; found {len(found)}. Set scheduler.name to 'wsd' or drop the "
            "pre_decay_checkpoint callback"
        )
    return found[0]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PreDecayCheckpoint(Callback):
    """Write a full checkpoint once, at the batch boundary where the WSD stable phase ends.

    Args:
        save_folder: Local folder (``{run_name}`` is filled in); usually the Trainer's ``save_folder``.
        filename: File name, formatted with Composer's time and rank fields (``{batch}``, ``{token}``,
            ``{epoch}``, ``{rank}``, ...). It must start with ``pre-decay``. Sharded (FSDP
            ``state_dict_type: sharded``) checkpoints are a directory of that name minus ``.pt``.
    """

    def __init__(
        self, save_folder: str = "{run_name}/checkpoints", filename: str = "pre-decay-ba{batch}.pt"
    ) -> None:
        if not Path(filename).name.startswith("pre-decay"):
            raise ValueError(
                f"PreDecayCheckpoint: filename={filename!r} must start with 'pre-decay' so the file says what it "
                "holds; e.g. 'pre-decay-ba{batch}.pt'"
            )
        if os.sep in filename:
            raise ValueError(
                f"PreDecayCheckpoint: filename={filename!r} is a file name, not a path; put the folder in save_folder"
            )
        self.save_folder = save_folder
        self.filename = filename
        self.saved_path: str | None = None
        self.saved_timestamp: dict | None = None

    def state_dict(self) -> dict:
        return {"saved_path": self.saved_path, "saved_timestamp": self.saved_timestamp}

    def load_state_dict(self, state: dict) -> None:
        self.saved_path = state.get("saved_path")
        self.saved_timestamp = state.get("saved_timestamp")

    def fit_start(self, state: State, logger: Logger) -> None:
        stable_end, unit_now = self._stable_end_and_now(state)
        if self.saved_path is None and unit_now >= stable_end.value:
            log.warning(
                "PreDecayCheckpoint: the run starts at %s, at or after the end of the stable phase (%s), and no "
                "pre-decay checkpoint was recorded; none will be written in this run",
                state.timestamp.get(stable_end.unit),
                stable_end,
            )

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.saved_path is not None or state.previous_timestamp is None:
            return
        stable_end, unit_now = self._stable_end_and_now(state)
        before = state.previous_timestamp.get(stable_end.unit).value
        if before < stable_end.value <= unit_now:
            # Recorded before writing, so the checkpoint's own copy of this callback says it was saved.
            self.saved_timestamp = state.timestamp.state_dict()
            self.saved_path = self._final_path(state)
            try:
                self._save(state)
            except BaseException:
                self.saved_path = self.saved_timestamp = None
                raise
            log.info(
                "PreDecayCheckpoint: stable phase ended at %s; saved %s at %s",
                stable_end,
                self.saved_path,
                state.timestamp,
            )

    def _stable_end_and_now(self, state: State) -> tuple[Time, int]:
        scheduler, ssr = _find_phased_scheduler(state)
        stable_end = scheduler.stable_end(state, ssr)
        return stable_end, state.timestamp.get(stable_end.unit).value

    def _final_path(self, state: State) -> str:
        folder = format_name_with_dist(self.save_folder, state.run_name)
        final_name = format_name_with_dist_and_time(self.filename, state.run_name, state.timestamp)
        if state.fsdp_sharded_state_dict_enabled:
            final_name = final_name.removesuffix(".pt")
        return os.path.join(folder, final_name)

    def _save(self, state: State) -> None:
        """Save to a hidden temporary name, then rename: rank 0 renames once every rank has written."""
        final = self._final_path(state)
        folder, final_name = os.path.split(final)
        tmp_name = ".tmp-" + final_name
        if state.fsdp_sharded_state_dict_enabled:
            # get_save_filename puts sharded files in <parent>/<sharded_ckpt_prefix_dir>/; give them a
            # private parent so they never share a directory with the CheckpointSaver's shards.
            tmp_root = os.path.join(folder, tmp_name)
            saved = checkpoint.save_checkpoint(state, os.path.join(tmp_root, "checkpoint"))
            # Every rank checks that its shard exists when save_checkpoint returns: rename after that.
            dist.barrier()
            if dist.get_global_rank() == 0:
                assert saved is not None, "rank 0 always writes a shard"
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(os.path.dirname(saved), final)
                shutil.rmtree(tmp_root)
        else:
            saved = checkpoint.save_checkpoint(state, os.path.join(folder, tmp_name))
            if dist.get_global_rank() == 0:
                assert saved is not None, "rank 0 writes the monolithic checkpoint"
                _fsync(saved)
                os.replace(saved, final)
        if dist.get_global_rank() == 0:
            _fsync(folder)
        dist.barrier()
