"""Composer's W&B logger, without the minute it spends at every start asking W&B for a checkpoint.

At the start of a run with ``autoresume`` and no checkpoint in its local ``save_folder``, the Composer
Trainer asks every logger destination for the latest checkpoint (``Trainer._try_checkpoint_download``).
Composer's ``WandBLogger`` answers by querying the W&B API for an artifact named after that checkpoint,
even when it could not hold one: it uploads checkpoints only with ``log_artifacts=True``, and an offline
run reaches no server. Offline, the query retries for about a minute before giving up (measured: a
5-batch tiny run with ``loggers.wandb: {init_kwargs: {mode: offline}}`` took 74 s, 60 of them there),
on every fresh start of every node. This logger says "not here" at once in those two cases and asks
W&B as Composer does otherwise.
"""

from __future__ import annotations

import os

from composer.loggers import WandBLogger as ComposerWandBLogger

# W&B's modes without a server (``wandb.init(mode=...)`` or the WANDB_MODE environment variable).
SERVERLESS_MODES = ("offline", "disabled", "dryrun")


class WandBLogger(ComposerWandBLogger):
    """``composer.loggers.WandBLogger``, whose checkpoint download fails fast where W&B cannot hold one."""

    def holds_checkpoints(self) -> bool:
        """Whether this run's checkpoints can be in W&B: uploaded as artifacts, to a server."""
        mode = self._init_kwargs.get("mode") or os.environ.get("WANDB_MODE", "online")
        return self._log_artifacts and str(mode).lower() not in SERVERLESS_MODES

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
    ) -> None:
        if not self.holds_checkpoints():
            raise FileNotFoundError(
                f"{remote_file_name}: W&B holds no checkpoint of this run (log_artifacts is false or W&B is offline)"
            )
        super().download_file(remote_file_name, destination, overwrite=overwrite, progress_bar=progress_bar)
