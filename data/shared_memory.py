"""Removing the shared memory that a crashed StreamingDataset run left behind.

Streaming keeps each dataset's coordination state in POSIX shared memory named
``{prefix:06d}_{block}`` (``/dev/shm`` on Linux), with file locks ``{prefix:06d}_*_filelock``
in the temporary folder. A run killed without cleanup leaves them; a later run on the same
local folders then waits on or trips over them. Streaming's own ``clean_stale_shared_memory``
removes *every* block it finds (live ones too) and stops at the first free prefix, which
misses leftovers above a gap: file locks never deleted push new prefixes upwards.

Here a block is stale when no live process maps it (``/proc/*/maps``): those of running
datasets, in this process or another, are left alone. Only the first local rank cleans; the
others wait at a barrier, as in Streaming.

Jobs on one machine also take turns (``machine_turn``) to clean and to create a dataset's blocks.
Streaming picks a prefix in two steps: every rank scans for the first free one, then the first
local rank creates it. Another job creating that prefix between the two steps fails this one:
the first local rank with ``FileExistsError``, or another rank with "shared memory prefix=... was
not registered by local leader" (both seen with two 2-process jobs on one machine).
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from streaming.base.constant import SHM_TO_CLEAN
from streaming.base.distributed import get_local_rank, maybe_init_dist

_SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^(\d{6})_(" + "|".join(SHM_TO_CLEAN) + r")$")
TURN_FILE = "streaming_prefix_turn.lock"
TURN_WAIT_S = 120.0
_turn = threading.local()  # this thread's depth of machine_turn blocks: the turn is re-entrant


def turn_path() -> Path:
    """The lock file jobs take turns on: beside the shared memory, so that it is shared exactly as
    /dev/shm is (a container with its own /dev/shm has its own turns)."""
    return (_SHM_DIR if _SHM_DIR.is_dir() else Path(tempfile.gettempdir())) / TURN_FILE


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _take_turn(wait_s: float) -> int | None:
    """An open descriptor of ``turn_path()`` holding its exclusive lock; None (with a warning) when the
    lock cannot be opened or is not free within ``wait_s``."""
    path = turn_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except OSError as err:
        warnings.warn(f"shared-memory turn not taken: cannot open {path} ({err}); going ahead", stacklevel=3)
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                warnings.warn(
                    f"another job has held {path} for over {wait_s:.0f} s; creating Streaming shared "
                    "memory without waiting longer (two jobs starting together may then race for one "
                    "prefix)",
                    stacklevel=3,
                )
                return None
            time.sleep(0.05)


@contextmanager
def machine_turn(wait_s: float = TURN_WAIT_S) -> Iterator[None]:
    """This job's turn, among the jobs on this machine, to clean and create Streaming shared memory.

    The first local rank takes an exclusive ``flock`` on ``turn_path()``; every rank then meets at
    a barrier (when torch.distributed runs), so no rank scans for a prefix before the turn is held.
    The lock is released when the block ends, or by the kernel when the process dies. A job that
    has waited ``wait_s`` goes ahead without the turn, with a warning: two multi-node jobs sharing
    nodes could otherwise each hold the turn on one node while waiting for the other's barrier.
    Every rank calls the barrier exactly once, whatever its lock did. Nested blocks in one thread
    take nothing more.
    """
    depth = getattr(_turn, "depth", 0)
    if depth:
        _turn.depth = depth + 1
        try:
            yield
        finally:
            _turn.depth -= 1
        return
    fd = _take_turn(wait_s) if get_local_rank() == 0 else None
    _turn.depth = 1
    try:
        _barrier()
        yield
    finally:
        _turn.depth = 0
        if fd is not None:
            os.close(fd)  # releases the lock


def _mapped_shm_names() -> set[str]:
    """Names of /dev/shm files that some readable live process has mapped."""
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/dev/shm/" in line:
                        mapped.add(line.rsplit("/dev/shm/", 1)[1].split(" ", 1)[0].strip())
        except OSError:  # the process ended, or belongs to another user
            continue
    return mapped


def stale_blocks() -> dict[str, list[str]]:
    """Streaming shared-memory blocks, by prefix, of which no live process maps any block."""
    if not _SHM_DIR.is_dir():
        return {}
    by_prefix: dict[str, list[str]] = {}
    for name in os.listdir(_SHM_DIR):
        match = _NAME.match(name)
        if match:
            by_prefix.setdefault(match.group(1), []).append(name)
    mapped = _mapped_shm_names()
    return {prefix: names for prefix, names in by_prefix.items() if not mapped.intersection(names)}


def clean_stale_shared_memory() -> list[str]:
    """Remove stale Streaming blocks and their file locks; returns the removed block names."""
    destroy_dist = maybe_init_dist()
    removed: list[str] = []
    try:
        with machine_turn():
            removed = _clean_in_turn()
    finally:
        if destroy_dist:
            dist.destroy_process_group()
    return removed


def _clean_in_turn() -> list[str]:
    removed: list[str] = []
    if get_local_rank() == 0:
        for prefix, names in stale_blocks().items():
            for name in names:
                try:
                    (_SHM_DIR / name).unlink()
                    removed.append(name)
                except FileNotFoundError:
                    continue
                except PermissionError:
                    warnings.warn(
                        f"cannot remove stale shared memory /dev/shm/{name}: permission denied",
                        stacklevel=3,
                    )
            for lock in Path(tempfile.gettempdir()).glob(f"{prefix}_*_filelock"):
                lock.unlink(missing_ok=True)
    _barrier()
    return removed
