"""common/io.py: atomic outputs land with the permissions a plain open()/mkdir() gives, not tempfile's 0600/0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.io import atomic_dir, atomic_write_text


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_outputs_get_default_permissions(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.bin").write_bytes(b"1")
        plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
        plain_file.write_text("x")
        plain_dir.mkdir()
    finally:
        os.umask(old)
    # The reference: what open() and mkdir() give under the same umask.
    assert mode(tmp_path / "a.txt") == mode(plain_file) == 0o666 & ~umask
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == mode(plain_dir) == 0o777 & ~umask
    assert mode(tmp_path / "out" / "sub" / "f.bin") == mode(plain_file)
