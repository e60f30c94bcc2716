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
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch.distributed as dist
from streaming.base.constant import SHM_TO_CLEAN
from streaming.base.distributed import get_local_rank, maybe_init_dist

_SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^(\d{6})_(" + "|".join(SHM_TO_CLEAN) + r")$")


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
                            stacklevel=2,
                        )
                for lock in Path(tempfile.gettempdir()).glob(f"{prefix}_*_filelock"):
                    lock.unlink(missing_ok=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if destroy_dist:
            dist.destroy_process_group()
    return removed
