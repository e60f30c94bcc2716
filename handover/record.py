"""The record kept in every checkpoint of a run: what model it holds and which tokenizer it reads.

``recipes/train.py`` adds ``HandoverRecord`` to every run (``handover.init_from.apply_init_from``);
``handover.weights.read_weights`` reads it back from the checkpoint's ``state/callbacks``.
"""

from __future__ import annotations

import json
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger

from common.config import to_dict
from models.config import MambaConfig

RECORD = "HandoverRecord"  # the callback's name in a Composer checkpoint's state/callbacks


class HandoverRecord(Callback):
    """Stores the model config, the tokenizer path and its special-token ids in every Composer checkpoint.

    Its ``state_dict`` is saved with the checkpoint like any callback's; ``read_weights`` reads
    it back, so a checkpoint needs no run folder or recipe beside it to be exported or used as
    ``init_from``, and an export states the tokenizer's bos/eos/pad ids even where the tokenizer
    itself is not reachable. Each is one JSON string: sharded checkpoints store it as one entry.
    """

    def __init__(
        self, model: MambaConfig, tokenizer: str = "", special_token_ids: dict[str, int | None] | None = None
    ) -> None:
        self.model_config_json = json.dumps(to_dict(model), sort_keys=True)
        self.tokenizer = tokenizer
        self.special_token_ids_json = json.dumps(special_token_ids) if special_token_ids is not None else ""

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config_json": self.model_config_json,
            "tokenizer": self.tokenizer,
            "special_token_ids_json": self.special_token_ids_json,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep this run's own config: a resumed or re-planned run records what it trains now."""

    def fit_start(self, state: State, logger: Logger) -> None:
        """Nothing to do at run time: the record is only read back from checkpoints."""
