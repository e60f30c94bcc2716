"""Failpoints: named places where the fault-injection suite (tests/fault_injection.py) strikes.

Off unless the environment variable ``MAMBA_FAILPOINT`` names one, as ``name@N`` (the N-th time
this process reaches ``name``) or ``name@N:rank=R`` (only on global rank R); when it is off a
failpoint costs one dictionary lookup. Reaching an armed failpoint kills the process with
SIGKILL, as the machine or the scheduler would: no cleanup, no ``finally``, no flush. The
points in the code:

- ``checkpoint_write``: inside the monolithic checkpoint writer, with half the file written;
- ``batch_end``, ``eval_batch_end``, ``batch_checkpoint``: at those Composer events (``callbacks/failpoint_hooks.py``);
- ``convert_chunk``: in ``data.convert``, between two chunks of documents (the earlier ones written).

``nan_loss@N`` is not a kill: it makes the loss of this process's N-th batch NaN
(``callbacks/failpoint_hooks.py``). ``name@N+`` fires at the N-th arrival and at every one after it
(``nan_loss@5+``: a NaN that comes back after every rollback).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "MAMBA_FAILPOINT"
_hits: Counter[str] = Counter()


def armed(name: str) -> int | None:
    """The hit count at which failpoint ``name`` fires in this process, or None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    point, _, rest = spec.partition("@")
    if point != name:
        return None
    count, _, rank = rest.partition(":rank=")
    if rank and int(rank) != int(os.environ.get("RANK", "0")):
        return None
    return int(count.rstrip("+") or 1)


def enabled() -> bool:
    """Whether any failpoint is armed in this process."""
    return bool(os.environ.get(ENV))


def reached(name: str) -> bool:
    """Count one arrival at ``name``; True when this is the armed one (or a later one, for ``@N+``)."""
    when = armed(name)
    if when is None:
        return False
    _hits[name] += 1
    repeats = os.environ[ENV].partition("@")[2].partition(":rank=")[0].endswith("+")
    return _hits[name] >= when if repeats else _hits[name] == when


def hit(name: str) -> None:
    """Kill this process with SIGKILL if failpoint ``name`` is armed for this arrival."""
    if reached(name):
        os.kill(os.getpid(), signal.SIGKILL)
