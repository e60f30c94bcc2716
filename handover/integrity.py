"""Checkpoints that are complete or absent, and a restart that never trips over a broken one.

Composer 0.32.1 writes a monolithic checkpoint in place (``torch.save`` into the final name), so a
process killed mid-write leaves a truncated ``ep0-baN-rank0.pt``; the same command then refuses to
start (``FileExistsError``), and a corrupted file ends the restart in a raw ``PytorchStreamReader``
traceback. Two remedies:

* ``install_atomic_checkpoint_writes``: Composer's monolithic writer writes to a hidden temporary
  name in the same folder, fsyncs, and renames (``os.replace``). A sharded (DCP) checkpoint is
  already safe to detect: torch writes its ``.metadata`` last, to a temporary name it renames.
* ``recover_checkpoint_folder``: before a run resumes, the newest checkpoint of its folder is
  verified (``handover.reader.checkpoint_problem``: a monolithic file's zip structure
  and every entry's CRC-32; a sharded folder's ``.metadata`` and the size of every file it
  references; once per file per process), moved aside to ``quarantine/`` with a
  warning naming it and why when it is broken, and so on down to the newest good one, which
  the ``latest`` link then points to, so Composer's autoresume continues from it.
* ``recover_object_store_folder``: the same for a save folder on an object store, where Composer
  uploads a checkpoint object by object and then the ``latest`` pointer (a ``.symlink`` object
  naming it). A kill between the two leaves objects newer than ``latest``; the restart would
  resume from ``latest`` and then refuse to write its own checkpoint of that step over them
  (``overwrite was set to False``). Every checkpoint newer than the one ``latest`` names (all of
  them when there is none) moves to ``quarantine/`` on the store, with a warning naming it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from composer.utils import (
    ObjectStoreTransientError,
    S3ObjectStore,
    maybe_create_object_store_from_uri,
    parse_uri,
)
from composer.utils import checkpoint as composer_checkpoint

from common import failpoints
from handover.reader import TRUST_HINT, checkpoint_problem, read_composer, read_dcp_metadata

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
# Recovery before a restart, on an object store

SYMLINK_SUFFIX = ".symlink"  # Composer's pointer object: a text file holding the object name it names


def _entry_of(relative: str) -> str | None:
    """The checkpoint a key (relative to the save folder) belongs to: a file or a sharded folder's name."""
    first, _, rest = relative.partition("/")
    if first.startswith((".", "latest")) or first == QUARANTINE or _step(first) < 0:
        return None
    if rest or first.endswith((".pt", ".pt.zst", ".tar.gz")):
        return first
    return None


def _move_objects(store: object, moves: list[tuple[str, str]]) -> None:
    """Copy every (source, target) key, then delete the sources: a failure leaves every source in place."""
    if not isinstance(store, S3ObjectStore):
        raise NotImplementedError(
            f"moving objects is implemented for s3:// stores only (this one is {type(store).__name__}); "
            f"move {', '.join(src for src, _ in moves)} out of the save folder by hand"
        )
    for src, dst in moves:
        # Managed copy: multipart above 5 GB, the size of a monolithic checkpoint of a 1.6B model.
        store.client.copy({"Bucket": store.bucket, "Key": src}, store.bucket, dst)
    for src, _ in moves:
        store.client.delete_object(Bucket=store.bucket, Key=src)


def latest_on_object_store(uri: str, latest_name: str = "latest-rank0.pt") -> str | None:
    """The object name the ``latest`` pointer of the save folder ``uri`` names, or None without one."""
    _, _, path = parse_uri(uri)
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    store = maybe_create_object_store_from_uri(uri)
    assert store is not None, f"{uri} is a local path"
    pointer = f"{prefix}{latest_name}{SYMLINK_SUFFIX}"
    if pointer not in store.list_objects(pointer):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(pointer))
        store.download_object(pointer, local)
        return Path(local).read_text().strip()


def recover_object_store_folder(
    uri: str, latest_name: str = "latest-rank0.pt", keep_up_to: int | None = None
) -> Recovery:
    """Move every checkpoint of the save folder ``uri`` newer than the one ``latest`` names to ``quarantine/``.

    With no ``latest`` pointer every checkpoint moves (the restart starts at batch 0 and writes
    them again). ``keep_up_to`` replaces the pointer's step: the pre-decay folder, which has no
    pointer of its own, keeps what the regular folder's ``latest`` covers. The checkpoint ``latest``
    names and older ones are not touched. A moved checkpoint ``ep0-ba2/`` lands under
    ``quarantine/ep0-ba2.<time>/`` (its objects keep their names). Runs on global rank 0 only.
    """
    backend, _, path = parse_uri(uri)
    assert backend, f"{uri} is a local path: use recover_checkpoint_folder"
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    store = maybe_create_object_store_from_uri(uri)
    assert store is not None
    latest = target = None
    if keep_up_to is None:
        target = latest_on_object_store(uri, latest_name)
        if target is not None:
            latest = target.rstrip("/").rsplit("/", 1)[-1]
            keep_up_to = _step(latest)
    entries: dict[str, list[str]] = {}
    for key in store.list_objects(prefix):
        entry = _entry_of(key[len(prefix) :])
        if entry is not None:
            entries.setdefault(entry, []).append(key)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    quarantined: list[tuple[str, str]] = []
    for entry in sorted(entries, key=_step, reverse=True):
        if keep_up_to is not None and _step(entry) <= keep_up_to:
            continue
        reason = (
            f"it is newer than the checkpoint latest names ({latest or f'batch {keep_up_to}'}): an interrupted upload"
            if keep_up_to is not None
            else "no latest pointer names a checkpoint: an interrupted first upload"
        )
        moved = f"{prefix}{QUARANTINE}/{entry}.{stamp}"
        _move_objects(store, [(key, moved + key[len(prefix + entry) :]) for key in sorted(entries[entry])])
        log.warning(
            "checkpoint %s is not resumable: %s; moved it to %s",
            store.get_uri(prefix + entry),
            reason,
            store.get_uri(moved),
        )
        quarantined.append((store.get_uri(prefix + entry), reason))
    return Recovery(quarantined, store.get_uri(target) if target else None)


def recover_before_resume(save_folder: str, pre_decay_folder: str | None = None) -> str | None:
    """Global rank 0's recovery before an autoresume: None, or why the folders could not be recovered.

    A local ``save_folder`` goes through ``recover_checkpoint_folder``, one on an object store
    through ``recover_object_store_folder``; so does ``pre_decay_folder`` when it is on an object
    store apart from the save folder, keeping what the save folder's ``latest`` covers. A failure
    talking to the store (or to the disk) is returned as a message for every rank to stop with.
    """
    where = save_folder
    try:
        if not parse_uri(save_folder)[0]:
            recover_checkpoint_folder(save_folder)
            return None
        kept = recover_object_store_folder(save_folder)
        if pre_decay_folder and parse_uri(pre_decay_folder)[0] and pre_decay_folder != save_folder:
            where = pre_decay_folder
            step = _step(kept.latest.rstrip("/").rsplit("/", 1)[-1]) if kept.latest else -1
            recover_object_store_folder(pre_decay_folder, keep_up_to=step)
    except (OSError, BotoCoreError, ClientError, ObjectStoreTransientError, NotImplementedError) as exc:
        return (
            f"could not set aside the interrupted checkpoints of {where} before resuming "
            f"({type(exc).__name__}: {exc}); check that the store is reachable and writable, then restart"
        )
    return None


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds, read without loading its tensors


def checkpoint_model_shapes(
    path: str | Path, trust: bool = False, opt_in: str = TRUST_HINT
) -> dict[str, tuple[int, ...]]:
    """Parameter name (as in ``MambaLMHeadModel``) -> shape, for a Composer checkpoint of this repository.

    A monolithic file is memory-mapped (its tensors are not read) and kept for Composer's own
    load of it (``handover.reader.read_composer(keep=True)``); a sharded one is
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


@dataclass(frozen=True)
class ShapeDifferences:
    """Parameter names (sorted) in which two name -> shape maps differ."""

    only_found: list[str]  # in what was read, not in what was expected
    only_expected: list[str]
    mismatched: list[str]  # in both, with other shapes

    def __bool__(self) -> bool:
        return bool(self.only_found or self.only_expected or self.mismatched)


def compare_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> ShapeDifferences:
    """Every name in which ``found`` (a checkpoint's tensors) and ``expected`` (a model's) differ."""
    return ShapeDifferences(
        sorted(found.keys() - expected.keys()),
        sorted(expected.keys() - found.keys()),
        sorted(n for n in found.keys() & expected.keys() if tuple(found[n]) != tuple(expected[n])),
    )


def shape_problems(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    key: str = "checkpoint.load_path",
    trust: bool = False,
    opt_in: str = TRUST_HINT,
) -> list[str]:
    """Every difference between the parameters of the checkpoint at ``path`` and ``expected``."""
    found = checkpoint_model_shapes(path, trust, opt_in)
    diff = compare_shapes(found, expected)
    problems = [
        f"{key}={path} has no parameter {name} {expected[name]}: it was made for another model"
        for name in diff.only_expected
    ]
    problems += [
        f"{key}={path} holds {name} {found[name]}, which this model does not have" for name in diff.only_found
    ]
    problems += [
        f"{key}={path}: {name} is {found[name]} in the checkpoint but {expected[name]} in this model; "
        "set the model.* fields of the run that wrote it (its run.json)"
        for name in diff.mismatched
    ]
    return problems
