"""Save one full checkpoint when the WSD stable phase ends: the start point of any later decay phase.

With a warmup-stable-decay schedule the weights at the end of the stable phase are the branch
point of the recipe: a decay phase (``DecayPhaseScheduler``) can be run from them at any later
time, for any length, on any data mixture (Hu et al. 2024; Hägele et al. 2024). This callback
is Composer's own ``CheckpointSaver`` (weights, optimizer, schedulers, timestamp, dataset state,
callbacks, RNG; monolithic or FSDP-sharded; a local folder or an object-store URI, uploaded by
Composer) whose save interval is "the batch boundary where the stable phase ends".

Which batch. The stable phase ends at ``T_s = scheduler.stable_end(state)``; the scheduler is
handed to the callback. The checkpoint is taken at ``Event.BATCH_CHECKPOINT`` of the batch for
which ``previous_timestamp < T_s <= timestamp`` (in ``T_s``'s unit). With ``T_s = S`` batches that
is the boundary after ``S`` trained batches, file ``pre-decay-baS.pt``. Composer evaluates the
scheduler after each step and before it advances the timestamp, so batch ``n`` trains with
``f(n - 1)``: every one of the ``S`` batches in the checkpoint trained at the peak lr (or in the
warmup), and the lr stored in it is the peak lr. With ``T_s`` in tokens or samples the boundary is
the first one at or after ``T_s``.

Resumption. The rule looks at the crossing, not at a flag: a run resumed after the boundary never
writes it again, a run resumed before it writes it when it gets there (overwriting a file left by
an interrupted attempt at the same step, which holds the same state). Callbacks run before the
Trainer's own ``CheckpointSaver`` in an event, so when the regular checkpoint of boundary ``S``
exists, the pre-decay checkpoint of ``S`` was written before it.

Where. ``folder`` (default ``{save_folder}/pre-decay`` in ``recipes/train.py``): a monolithic
checkpoint is ``pre-decay-baS.pt`` there; a sharded one is the folder Composer names after the
step (``ep0-baS/``, one ``.distcp`` file per rank and ``.metadata``). A folder of its own keeps
the sharded pre-decay checkpoint from sharing a directory with the regular one of the same step.

Decay-phase workflow: a new run with ``checkpoint.load_path=<folder>/pre-decay-baS.pt`` and
``load_ignore_keys=['state/timestamp', 'state/dataset_state', 'state/schedulers', 'state/callbacks']``
restores the weights and the AdamW state (moments and step counts) and starts its own timestamp,
schedule and data at 0 (``DecayPhaseScheduler(t_start='0ba')``; tested). Loading it whole instead
continues the same run, data position included, with ``DecayPhaseScheduler(t_start='Sba')``.
"""

from __future__ import annotations

import os

from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import parse_uri

from callbacks.schedulers import PhasedScheduler


class PreDecayCheckpoint(Callback):
    """Write a full checkpoint once, at the batch boundary where ``scheduler``'s stable phase ends.

    Args:
        scheduler: The run's schedule (the one given to the Trainer).
        folder: A local folder or an object-store URI (``s3://bucket/run/pre-decay``); ``{run_name}``
            is filled in.
        filename: File name of a monolithic checkpoint, with Composer's time and rank fields.
        ssr: The Trainer's scale schedule ratio (1 unless the run scales its schedule).
    """

    def __init__(
        self,
        scheduler: PhasedScheduler,
        folder: str,
        filename: str = "pre-decay-ba{batch}.pt",
        ssr: float = 1.0,
    ) -> None:
        if not os.path.basename(filename).startswith("pre-decay") or os.sep in filename:
            raise ValueError(
                f"PreDecayCheckpoint: filename={filename!r} must be a file name starting with 'pre-decay' "
                "(e.g. 'pre-decay-ba{batch}.pt'); put the folder in folder"
            )
        self.scheduler = scheduler
        self.ssr = ssr
        backend, _, path = parse_uri(folder)
        self.saver = CheckpointSaver(
            folder=folder,
            filename=filename,
            remote_file_name=os.path.join(path, filename) if backend else None,
            latest_filename=None,
            latest_remote_file_name=None,
            save_interval=self.at_stable_end,
            overwrite=True,
        )

    def at_stable_end(self, state: State, event: Event) -> bool:
        """Whether this batch boundary is the first at or after the end of the stable phase."""
        if event != Event.BATCH_CHECKPOINT or state.previous_timestamp is None:
            return False
        stable_end = self.scheduler.stable_end(state, self.ssr)
        before = state.previous_timestamp.get(stable_end.unit).value
        return before < stable_end.value <= state.timestamp.get(stable_end.unit).value

    @property
    def saved_checkpoints(self) -> list[str]:
        """Local paths written by this process (one checkpoint per run at most)."""
        return self.saver.saved_checkpoints

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        self.saver.run_event(event, state, logger)

    def close(self, state: State, logger: Logger) -> None:
        self.saver.close(state, logger)

    def post_close(self) -> None:
        self.saver.post_close()
