"""Checkpoints that are complete or absent, and a restart that never trips over a broken one.

Composer 0.32.1 writes a monolithic checkpoint in place (``torch.save`` into the final name), so a
process killed mid-write leaves a truncated ``ep0-baN-rank0.pt``; the same command then refuses to
start (``FileExistsError``), and a corrupted file ends the restart in a raw ``PytorchStreamReader``
traceback. Two remedies:

* ``install_atomic_checkpoint_writes``: Composer's monolithic writer writes to a hidden temporary
  name in the same folder, fsyncs, and renames (``os.replace``). A sharded (DCP) checkpoint is
  already safe to detect: torch writes its ``.metadata`` last, to a temporary name it renames.
* ``recover_checkpoint_folder``: before a run resumes, the newest checkpoint of its folder is
  verified (``models.checkpoint_reader.checkpoint_problem``: a monolithic file's zip structure
  and every entry's CRC-32; a sharded folder's ``.metadata`` and the size of every file it
  references; once per file per process), moved aside to ``quarantine/`` with a
  warning naming it and why when it is broken, and so on down to the newest good one, which
  the ``latest`` link then points to, so Composer's autoresume continues from it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.utils import checkpoint as composer_checkpoint

from common import failpoints
from models.checkpoint_reader import TRUST_HINT, checkpoint_problem, read_composer, read_dcp_metadata

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


def checkpoint_model_shapes(
    path: str | Path, trust: bool = False, opt_in: str = TRUST_HINT
) -> dict[str, tuple[int, ...]]:
    """Parameter name (as in ``MambaLMHeadModel``) -> shape, for a Composer checkpoint of this repository.

    A monolithic file is memory-mapped (its tensors are not read) and kept for Composer's own
    load of it (``models.checkpoint_reader.read_composer(keep=True)``); a sharded one is
    described by its ``.metadata``. ``trust``: full pickle (see ``read_composer``).
    """
    path = Path(path)
    if path.is_dir():
        meta = read_dcp_metadata(path, opt_in=opt_in)
        shapes = {}
        for key, item in meta.state_dict_metadata.items():
            if key.startswith("state.model.") and hasattr(item, "size"):
                shapes[key.removeprefix("state.model.").removeprefix("model.")] = tuple(item.size)
        return shapes
    state = read_composer(path, trust=trust, opt_in=opt_in, keep=True)
    return {k.removeprefix("model."): tuple(v.shape) for k, v in state["state"]["model"].items()}


def shape_problems(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    key: str = "checkpoint.load_path",
    trust: bool = False,
    opt_in: str = TRUST_HINT,
) -> list[str]:
    """Every difference between the parameters of the checkpoint at ``path`` and ``expected``."""
    found = checkpoint_model_shapes(path, trust, opt_in)
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
