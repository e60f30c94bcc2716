"""Atomic file output: write to a temporary name beside the target, then rename; and reading a
JSON object with one line naming the file when it is not one.

A crash mid-write leaves either the old file or no file, never a truncated one that looks
complete. What is renamed into place gets the permissions a plain ``open()`` / ``mkdir()``
would have given it (0666 / 0777 minus the umask): ``tempfile`` creates its files 0600 and
its folders 0700, which would leave exported models and datasets unreadable to other users.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.cli import UserError


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_permissions(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything inside it) the default permissions."""
    mask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success."""
    target = Path(target)
    made = _make_parents(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _normal_permissions(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
            _remove_empty(made)


def _make_parents(target: Path) -> list[Path]:
    """Create ``target``'s missing parent folders; returns those it created, deepest first."""
    made = []
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first) while they are empty."""
    for folder in folders:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()


def check_output_path(target: str | Path, flag: str, overwrite: bool = False, folder: bool = True) -> None:
    """Refuse, naming ``flag``, an output path that cannot be written, before any work is done.

    The path must not exist (unless ``overwrite``, and then be of the same kind: a folder for
    ``folder`` outputs, a file otherwise), and the nearest existing folder above it must be a
    writable folder, not a file. Object-store URIs (``s3://...``) are left to the upload.
    """
    if "://" in str(target):
        return
    target = Path(target)
    kind = "folder" if folder else "file"
    if target.exists():
        if target.is_dir() != folder:
            raise UserError(
                f"{flag} {target} is a {'folder' if target.is_dir() else 'file'}; give a {kind} path"
            )
        if not overwrite:
            raise FileExistsError(f"{flag} {target} already exists; remove it or pass --overwrite")
    above = target.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"{flag} {target}: {above} is a file, not a folder; give a path under a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {target}: the folder {above} is not writable here; give another path")


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it onto ``target`` on success.

    With ``overwrite`` an existing ``target`` is replaced; otherwise it is an error to
    write onto an existing folder.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or pass overwrite")
    made = _make_parents(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
            _remove_empty(made)


def read_json_object(path: str | Path, what: str, fix: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``; a ValueError naming the file (and ``fix``, if given) when it is
    not valid JSON or not an object (``what`` names what it should be, e.g. "an evaluation")."""
    tail = f"; {fix}" if fix else ""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}){tail}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a {type(raw).__name__}, not {what}{tail}")
    return raw
