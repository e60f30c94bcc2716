"""The training console a person reads: one progress line per phase, one line per evaluation.

Composer's ``ConsoleLogger`` prints every logged metric, about fifteen lines per logging step, and
its progress bar first dumps the whole hyperparameter tree. This logger prints, on global rank 0
only:

- when training starts, one line: the run, where its clock stands and where it ends;
- a progress line redrawn in place (``\\r``): the position in ``max_duration``'s unit, the training
  loss, tokens per second and the time left; with ``progress_bar=False`` a new line every
  ``interval`` batches instead (for logs that several runs share);
- one line per evaluation: each metric of the evaluator, and its duration;
- when the Trainer closes, where the checkpoints went (regular and pre-decay).

It only prints: every metric still reaches the metrics file (``callbacks/jsonl_logger.py``) and
every other logger. Tokens per second and the time left count training time only (evaluation
excluded), over the batches this process has trained. ``recipes/train.py`` uses it unless
``logging.verbose`` (``--verbose``) asks for Composer's full dump.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from composer.callbacks import CheckpointSaver
from composer.core import State, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist, format_name_with_dist, parse_uri

from callbacks.pre_decay_checkpoint import PreDecayCheckpoint

UNIT_SUFFIX = {TimeUnit.BATCH: "ba", TimeUnit.TOKEN: "tok", TimeUnit.SAMPLE: "sp", TimeUnit.EPOCH: "ep"}
BAR_WIDTH = 20
TRAIN_LOSS = "loss/train/total"


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(
    done: int, total: int, unit: str, loss: float | None, tokens_per_s: float | None, eta_s: float
) -> str:
    """One progress line, e.g. ``[train] |#####-----| 135/270ba  50% loss 5.123  12,345 tok/s  ETA 3:21``."""
    fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
    filled = round(fraction * BAR_WIDTH)
    parts = [f"[train] |{'#' * filled}{'-' * (BAR_WIDTH - filled)}| {done}/{total}{unit} {fraction:4.0%}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def _entry(path: str, folder: str) -> str:
    """A checkpoint's name in its folder: the file, or a sharded checkpoint's own folder (``ep0-ba8``)."""
    try:
        return Path(path).relative_to(folder).parts[0]
    except ValueError:
        return Path(path).name


def _scalar(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


class ConsoleProgress(LoggerDestination):
    """A quiet console for a training run (global rank 0 prints, the other ranks stay silent).

    Args:
        progress_bar: Redraw one progress line in place; False prints a new line every ``interval``.
        interval: Batches between two progress lines when ``progress_bar`` is False.
        redraw_seconds: The least time between two redraws of the progress line.
        stream: Where to print (default: ``sys.stdout`` when the run starts).
    """

    def __init__(
        self,
        progress_bar: bool = True,
        interval: int = 10,
        redraw_seconds: float = 0.5,
        stream: TextIO | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"ConsoleProgress: interval={interval} must be a positive number of batches")
        self.progress_bar = progress_bar
        self.interval = interval
        self.redraw_seconds = redraw_seconds
        self.stream = stream
        self.loss: float | None = None
        self.eval_metrics: dict[str, float] = {}
        self._open = 0  # length of the progress line drawn without its newline (0: none)
        self._drawn = ""  # that line
        self._closed = False
        self._last_draw = -math.inf
        self._train_seconds = 0.0  # training time of this process so far, evaluation excluded
        self._batch_started = 0.0
        self._eval_started = 0.0
        self._start_tokens = 0
        self._start_fraction = 0.0

    @property
    def _prints(self) -> bool:
        return dist.get_global_rank() == 0

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text)
        stream.flush()

    def _print(self, line: str) -> None:
        """A line of its own, below the progress line if one is open."""
        if not self._prints:
            return
        if self._open:
            self._write("\n")
            self._open = 0
        self._write(line + "\n")

    # ---- metrics ---------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if key == TRAIN_LOSS:
                self.loss = _scalar(value)
            elif key.startswith("metrics/") and not key.startswith("metrics/train/"):
                self.eval_metrics[key] = _scalar(value)

    # ---- training --------------------------------------------------------------------------
    def fit_start(self, state: State, logger: Logger) -> None:
        self._start_tokens = int(state.timestamp.token)
        self._start_fraction = self._fraction(state)
        assert state.max_duration is not None, "the Trainer sets max_duration before fit_start"
        unit = UNIT_SUFFIX[state.max_duration.unit]
        now = int(state.timestamp.get(state.max_duration.unit))
        where = "from the start" if now == 0 else f"resumed at {now}{unit}"
        self._print(f"[train] {state.run_name}: training to {state.max_duration.value}{unit}, {where}")

    def batch_start(self, state: State, logger: Logger) -> None:
        self._batch_started = time.monotonic()

    def batch_end(self, state: State, logger: Logger) -> None:
        now = time.monotonic()
        self._train_seconds += now - self._batch_started
        if not self._prints:
            return
        fraction = self._fraction(state)
        finished = fraction >= 1.0
        if self.progress_bar:
            if finished or now - self._last_draw >= self.redraw_seconds:
                self._draw(state, fraction)
                self._last_draw = now
        elif finished or int(state.timestamp.batch) % self.interval == 0:
            self._print(self._line(state, fraction))

    def _fraction(self, state: State) -> float:
        elapsed = state.get_elapsed_duration()
        return float(elapsed.value) if elapsed is not None else 0.0

    def _line(self, state: State, fraction: float) -> str:
        assert state.max_duration is not None, "training has a max_duration"
        unit = state.max_duration.unit
        done = int(state.timestamp.get(unit))
        tokens = int(state.timestamp.token) - self._start_tokens
        seconds = self._train_seconds
        tokens_per_s = tokens / seconds if seconds > 0 and tokens > 0 else None
        session = fraction - self._start_fraction
        eta = seconds * (1.0 - fraction) / session if session > 0 else math.nan
        return progress_line(done, state.max_duration.value, UNIT_SUFFIX[unit], self.loss, tokens_per_s, eta)

    def _draw(self, state: State, fraction: float) -> None:
        line = self._line(state, fraction)
        if self._open and line == self._drawn:
            return
        self._write("\r" + line.ljust(self._open))
        self._open, self._drawn = max(len(line), 1), line

    # ---- evaluation ------------------------------------------------------------------------
    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_started = time.monotonic()
        self.eval_metrics = {}
        if self._open:  # the progress line as it stands when evaluation begins, then a new line
            self._draw(state, self._fraction(state))
            self._print_newline()

    def _print_newline(self) -> None:
        if self._prints and self._open:
            self._write("\n")
            self._open = 0

    def eval_end(self, state: State, logger: Logger) -> None:
        label = state.dataloader_label or "eval"
        prefix = f"metrics/{label}/"
        values = "  ".join(
            f"{key[len(prefix) :]} {value:.4g}"
            for key, value in self.eval_metrics.items()
            if key.startswith(prefix)
        )
        seconds = time.monotonic() - self._eval_started
        where = f"batch {int(state.timestamp.batch)}" + ("" if label == "eval" else f" ({label})")
        self._print(f"[eval] {where}: {values}  ({format_duration(seconds)})")

    # ---- the end ---------------------------------------------------------------------------
    def close(self, state: State, logger: Logger) -> None:
        # Composer closes its callbacks again at interpreter exit (atexit): report once.
        if self._closed:
            return
        self._closed = True
        self._print_newline()
        for callback in state.callbacks:
            if isinstance(callback, PreDecayCheckpoint):
                self._report_saver("pre-decay checkpoint", callback.saver, state.run_name)
            elif isinstance(callback, CheckpointSaver):
                self._report_saver("checkpoints", callback, state.run_name)

    def _report_saver(self, what: str, saver: CheckpointSaver, run_name: str) -> None:
        folder = format_name_with_dist(saver.folder, run_name)
        saved = list(saver.all_saved_checkpoints_to_timestamp)
        if not saved:
            return
        if parse_uri(folder)[0]:  # an object store: the local files were temporary
            self._print(f"[train] {what}: {len(saved)} uploaded to {folder}")
            return
        names = ", ".join(_entry(path, folder) for path in saved)
        self._print(f"[train] {what} in {folder}: {names}")
