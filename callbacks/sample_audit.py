"""Which samples trained in which batch: one JSON line per batch and rank.

``samples-rank{R}.jsonl`` in the run folder gets ``{"batch": n, "samples": [ids]}`` for every
batch, the dataset index of each of this rank's samples (``data/loader.py`` serves it as
``sample_id``), written and flushed at the end of the batch. A batch trained again after a crash
(the steps between the last checkpoint and the crash) is written again: the last line of a batch
is the one its weights carry. Use it to tell what data a loss spike came with, or to audit that
a resumed run trained every sample exactly once (tests/fault_injection.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class SampleAudit(Callback):
    """Append the dataset index of every sample of every batch to ``samples-rank{R}.jsonl``.

    Args:
        run_dir: The run's folder (supplied by the run).
    """

    def __init__(self, run_dir: str) -> None:
        self.path = Path(run_dir) / f"samples-rank{dist.get_global_rank()}.jsonl"
        self._file = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._file is None or not isinstance(state.batch, dict) or "sample_id" not in state.batch:
            return
        ids = [int(i) for i in state.batch["sample_id"].tolist()]
        batch = int(state.timestamp.batch) - 1  # the batch just trained
        self._file.write(json.dumps({"batch": batch, "samples": ids}) + "\n")
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_audit(path: str | Path) -> dict[int, list[int]]:
    """Batch -> sample ids, keeping the last line of a batch trained more than once (a torn last
    line from a killed run is ignored)."""
    batches: dict[int, list[int]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        batches[int(record["batch"])] = list(record["samples"])
    return batches
