"""How many intra-op threads each training process uses, decided once at start-up.

torch's default is every core of the machine, in every process. Two things go wrong with that
on a small shared machine: ``composer -n 2`` on 2 cores gives each rank both cores (4 threads
on 2 cores), and with other jobs running, threads that wait for a descheduled sibling spin in
OpenMP barriers (a tiny recipe trained 5 batches in 294 s that way, about 40x slower than with
one thread, on this project's 2-core machines). So each rank takes the cores this process may actually run
on (its CPU affinity, which ``taskset``, cgroups' cpusets and job schedulers narrow) divided
by the ranks the launcher started on this node (``LOCAL_WORLD_SIZE``, set by the ``composer``
launcher and by torchrun), at least one.

Precedence: an explicit request (the recipe's ``threads`` key) over ``OMP_NUM_THREADS``
(a user who exported it meant it) over that computation.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    """Cores this process may run on (its affinity mask; all cores where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_ranks() -> int:
    """Processes the launcher started on this node (``LOCAL_WORLD_SIZE``; 1 without a launcher)."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE={raw!r} is not an integer (set by the launcher)") from None
    if value < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={value} must be >= 1 (set by the launcher)")
    return value


def decide_threads(requested: int | None) -> tuple[int, str]:
    """(threads, why) for this process; see the module docstring for the precedence."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested} must be >= 1, or null to size from the cores available")
        return requested, f"threads={requested} in the config"
    env = os.environ.get("OMP_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not an integer; unset it or give a count") from None
        if n >= 1:
            return n, f"OMP_NUM_THREADS={n}"
    cores, ranks = available_cores(), local_ranks()
    return max(1, cores // ranks), f"{cores} cores available to this process / {ranks} local rank(s)"


def configure_threads(requested: int | None) -> str:
    """Set torch's intra-op threads for this process; returns the line to print at start-up."""
    n, why = decide_threads(requested)
    torch.set_num_threads(n)
    return f"threads: {n} intra-op thread(s) per rank ({why}; override with threads=N)"
