"""Pre-decay checkpoints on object stores: write locally, then upload through Composer's layer.

Composer's own ``CheckpointSaver`` uploads the regular checkpoints when ``save_folder`` is a URI
(``s3://bucket/run/checkpoints``). ``PreDecayCheckpoint`` (callbacks/pre_decay_checkpoint.py)
writes local folders only, so for a URI ``save_folder`` it writes into the run's local
``checkpoints/`` folder and ``UploadPreDecay`` uploads what it wrote, once, right after it (same
event, next in the callback list): the monolithic file from rank 0, or for a sharded checkpoint
each rank's own ``__{rank}_0.distcp`` and rank 0's ``.metadata``. The upload uses
``composer.utils.maybe_create_object_store_from_uri`` (``S3_ENDPOINT_URL`` is honoured), and
object puts are atomic, so a reader never sees half a file. The result is a checkpoint at
``<save_folder>/pre-decay-ba<S>.pt`` that ``checkpoint.load_path``, ``init_from`` and
``recipes.export`` read like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist, maybe_create_object_store_from_uri, parse_uri

from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
from models.checkpoint_io import is_uri


class UploadPreDecay(Callback):
    """Upload the checkpoint ``pre_decay`` wrote to ``remote_folder`` (see the module doc)."""

    def __init__(self, pre_decay: PreDecayCheckpoint, remote_folder: str) -> None:
        self.pre_decay = pre_decay
        self.remote_folder = remote_folder.rstrip("/")
        self.uploaded: str | None = None

    def state_dict(self) -> dict[str, str | None]:
        return {"uploaded": self.uploaded}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        self.uploaded = state.get("uploaded")

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        local = self.pre_decay.saved_path
        if local is None or local == self.uploaded:
            return
        folder = format_name_with_dist(self.remote_folder, state.run_name)
        store = maybe_create_object_store_from_uri(folder)
        prefix = parse_uri(folder)[2].rstrip("/")
        name = os.path.basename(local)
        rank = dist.get_global_rank()
        if os.path.isdir(local):
            mine = [f"__{rank}_0.distcp"] + ([".metadata"] if rank == 0 else [])
            for file in mine:
                if os.path.exists(os.path.join(local, file)):
                    store.upload_object(f"{prefix}/{name}/{file}", os.path.join(local, file))
        elif rank == 0:
            store.upload_object(f"{prefix}/{name}", local)
        dist.barrier()
        self.uploaded = local


def pre_decay_callbacks(save_folder: str, run_dir: Path) -> list[Callback]:
    """The pre-decay checkpoint callback for ``save_folder``, with its uploader when that is a URI."""
    if not is_uri(save_folder):
        return [PreDecayCheckpoint(save_folder=save_folder)]
    local = PreDecayCheckpoint(save_folder=str(run_dir / "checkpoints"))
    return [local, UploadPreDecay(local, save_folder)]
