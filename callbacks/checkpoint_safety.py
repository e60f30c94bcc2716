"""Checkpoints that are complete or absent, and a restart that never trips over a broken one.

Composer 0.32.1 writes a monolithic checkpoint in place (``torch.save`` into the final name), so a
process killed mid-write leaves a truncated ``ep0-baN-rank0.pt``; the same command then refuses to
start (``FileExistsError``), and a corrupted file ends the restart in a raw ``PytorchStreamReader``
traceback. Two remedies:

* ``install_atomic_checkpoint_writes``: Composer's monolithic writer writes to a hidden temporary
  name in the same folder, fsyncs, and renames (``os.replace``). A sharded (DCP) checkpoint is
  already safe to detect: torch writes its ``.metadata`` last, to a temporary name it renames.
* ``recover_checkpoint_folder``: before a run resumes, the newest checkpoint of its folder is
  verified (a monolithic file's zip structure and every entry's CRC-32; a sharded folder's
  ``.metadata`` and the size of every file it references), moved aside to ``quarantine/`` with a
  warning naming it and why when it is broken, and so on down to the newest good one, which
  the ``latest`` link then points to, so Composer's autoresume continues from it.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import signal
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.utils import checkpoint as composer_checkpoint

from common import failpoints

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
_FULL_DISK_BYTES = 1 << 20  # a failed write with less than this free is taken for a full disk
TMP_PREFIX = ".tmp-"
_STEP = re.compile(r"ba(\d+)")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_atomic_checkpoint_writes() -> None:
    """Make Composer write monolithic checkpoints to a temporary name, then rename (idempotent)."""
    original: Callable[[dict[str, Any], str], None] = composer_checkpoint._write_checkpoint_file
    if getattr(original, "atomic", False):
        return

    def write_atomically(state_dict: dict[str, Any], filename: str) -> None:
        folder, name = os.path.split(filename)
        # The temporary name keeps the suffix: Composer picks compression (.pt.zst, .tar.gz) by it.
        tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{name}")
        try:
            try:
                original(state_dict, tmp)
            except (RuntimeError, OSError) as exc:
                # torch.save reports a full disk as "unexpected pos ..." (a RuntimeError): say what it is.
                free = shutil.disk_usage(folder or ".").free
                if free < _FULL_DISK_BYTES:
                    raise OSError(
                        errno.ENOSPC,
                        f"No space left on device writing the checkpoint {filename} ({free} bytes free)",
                    ) from exc
                raise
            if failpoints.reached("checkpoint_write"):  # the fault suite: a kill with half the file written
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            _fsync(tmp)
            os.replace(tmp, filename)
            _fsync(folder or ".")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    write_atomically.atomic = True  # type: ignore[attr-defined]
    composer_checkpoint._write_checkpoint_file = write_atomically


# ----------------------------------------------------------------------------------------------
# Verification


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None if it is whole.

    A monolithic ``.pt`` is a zip archive (torch's format): its central directory must be there
    and every entry must match its CRC-32 (this reads the whole file). A sharded checkpoint is a
    folder whose ``.metadata`` (written last) must load and whose every referenced byte range must
    exist. Other formats (compressed ``.pt.zst``, tarballs) are checked for presence only.
    """
    path = Path(path)
    if path.is_dir():
        return _sharded_problem(path)
    if not path.is_file():
        return "it does not exist"
    if path.stat().st_size == 0:
        return "it is empty (0 bytes): the write was interrupted"
    if path.suffix != ".pt":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"it is truncated or not a checkpoint ({exc})"
    if bad is not None:
        return f"its entry {bad} fails its CRC-32 check (the file's bytes changed after it was written)"
    return None


def _sharded_problem(folder: Path) -> str | None:
    metadata = folder / ".metadata"
    if not metadata.is_file():
        return "it has no .metadata (torch writes it last: the save was interrupted)"
    try:
        with metadata.open("rb") as f:
            meta = pickle.load(f)
    except Exception as exc:  # a torn or foreign pickle raises many kinds of errors
        return f"its .metadata cannot be read ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for item in (getattr(meta, "storage_data", None) or {}).values():
        name = str(getattr(item, "relative_path", ""))
        end = int(getattr(item, "offset", 0)) + int(getattr(item, "length", 0))
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            return f"its shard file {name} is missing"
        if file.stat().st_size < end:
            return f"its shard file {name} is truncated ({file.stat().st_size} bytes, {end} expected)"
    return None


# ----------------------------------------------------------------------------------------------
# Recovery before a restart


@dataclass(frozen=True)
class Recovery:
    """What ``recover_checkpoint_folder`` did: checkpoints set aside (path, reason) and the one kept."""

    quarantined: list[tuple[str, str]]
    latest: str | None


def _step(name: str) -> int:
    match = _STEP.search(name)
    return int(match.group(1)) if match else -1


def _candidates(folder: Path) -> list[Path]:
    """Checkpoints in ``folder`` (files and sharded folders), newest step first."""
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith((".", "latest")) or entry.name == QUARANTINE or entry.is_symlink():
            continue
        if _step(entry.name) >= 0 and (entry.is_dir() or entry.name.endswith((".pt", ".pt.zst", ".tar.gz"))):
            found.append(entry)
    return sorted(found, key=lambda p: _step(p.name), reverse=True)


def _quarantine(entry: Path, reason: str, folder: Path) -> str:
    target = folder / QUARANTINE / f"{entry.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(exist_ok=True)
    shutil.move(str(entry), str(target))
    log.warning("checkpoint %s is broken: %s; moved it to %s", entry, reason, target)
    return str(target)


def remove_interrupted_writes(folder: str | Path) -> list[str]:
    """Delete the temporary files (``.tmp-<pid>-...``) that killed checkpoint writes left in ``folder``.

    Every folder a run writes monolithic checkpoints to needs it before a restart: the regular one
    and the pre-decay one (at 1.6B each leftover is gigabytes). Returns the names removed.
    """
    folder = Path(folder)
    removed = []
    for leftover in folder.glob(f"{TMP_PREFIX}*") if folder.is_dir() else []:
        leftover.unlink(missing_ok=True) if leftover.is_file() else shutil.rmtree(leftover)
        removed.append(leftover.name)
    if removed:
        log.warning("removed %s in %s, left by an interrupted checkpoint write", ", ".join(removed), folder)
    return removed


def recover_checkpoint_folder(folder: str | Path, latest_name: str = "latest-rank0.pt") -> Recovery:
    """Leave ``folder`` with its newest good checkpoint as ``latest``; broken ones go to ``quarantine/``.

    Leftover temporary files of an interrupted write are removed. Checkpoints older than the
    newest good one are not read. Runs on one process (global rank 0) before the Trainer loads.
    """
    folder = Path(folder)
    quarantined: list[tuple[str, str]] = []
    if not folder.is_dir():
        return Recovery(quarantined, None)
    remove_interrupted_writes(folder)
    good = None
    for entry in _candidates(folder):
        reason = checkpoint_problem(entry)
        if reason is None:
            good = entry
            break
        quarantined.append((str(entry), reason))
        _quarantine(entry, reason, folder)
    link = folder / latest_name
    if good is None:
        if link.is_symlink() or link.exists():
            link.unlink()
        return Recovery(quarantined, None)
    if not link.is_symlink() or Path(os.readlink(link)).name != good.name:
        # The newest good checkpoint (a kill can fall between its rename and the link update).
        tmp = folder / f"{TMP_PREFIX}{latest_name}"
        tmp.unlink(missing_ok=True)
        os.symlink(good.name, tmp)
        os.replace(tmp, link)
        if quarantined:
            log.warning("autoresume continues from %s", good)
    return Recovery(quarantined, str(good))


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds, read without loading its tensors


def checkpoint_model_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name (as in ``MambaLMHeadModel``) -> shape, for a Composer checkpoint of this repository.

    A monolithic file is memory-mapped (its tensors are not read); a sharded one is described by
    its ``.metadata``.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        with (path / ".metadata").open("rb") as f:
            meta = pickle.load(f)
        shapes = {}
        for key, item in meta.state_dict_metadata.items():
            if key.startswith("state.model.") and hasattr(item, "size"):
                shapes[key.removeprefix("state.model.").removeprefix("model.")] = tuple(item.size)
        return shapes
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {k.removeprefix("model."): tuple(v.shape) for k, v in state["state"]["model"].items()}


def shape_problems(
    path: str | Path, expected: dict[str, tuple[int, ...]], key: str = "checkpoint.load_path"
) -> list[str]:
    """Every difference between the parameters of the checkpoint at ``path`` and ``expected``."""
    found = checkpoint_model_shapes(path)
    problems = []
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            problems.append(
                f"{key}={path} has no parameter {name} {expected[name]}: it was made for another model"
            )
        elif name not in expected:
            problems.append(f"{key}={path} holds {name} {found[name]}, which this model does not have")
        elif found[name] != expected[name]:
            problems.append(
                f"{key}={path}: {name} is {found[name]} in the checkpoint but {expected[name]} in this model; "
                "set the model.* fields of the run that wrote it (its run.json)"
            )
    return problems
