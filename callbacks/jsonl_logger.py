"""A JSON-lines metrics file: one line per logged step, always written (rank 0).

Every line is ``{"step": int, "<metric>": value, ...}``, flushed as it is written, so a run
killed at any point leaves a file whose complete lines are all valid; plots and the
evaluation scripts read it back (``read_jsonl``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class JSONLinesLogger(LoggerDestination):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = None

    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self._write({"hyperparameters": hyperparameters})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"step": step, **{k: _plain(v) for k, v in metrics.items()}})

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a metrics file (a torn last line from a killed run is dropped)."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # the line being written when the run was killed
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc})") from exc
    return records
