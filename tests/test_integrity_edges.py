"""Whole-or-absent checkpoint writes and the local recovery, at their edges: which names count as
checkpoints and in which order, what is set aside and logged, the full-disk message, and a folder
with nothing good left (the mutation tests' reference, ``python -m tests.mutants checkpoint_safety``)."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.utils import checkpoint as composer_checkpoint

from handover import integrity
from handover.integrity import (
    QUARANTINE,
    _candidates,
    _quarantine,
    _step,
    install_atomic_checkpoint_writes,
    recover_checkpoint_folder,
    remove_interrupted_writes,
)

LOGGER = "handover.integrity"


class _Usage:
    """What ``shutil.disk_usage`` answers, as far as the writer reads it."""

    def __init__(self, free: int) -> None:
        self.free = free


def save(path: Path, value: float = 1.0) -> Path:
    torch.save({"state": {"model": {"w": torch.full((4, 4), value)}}}, path)
    return path


def test_the_step_is_the_number_after_ba() -> None:
    assert _step("ep0-ba12-rank0.pt") == 12
    assert _step("ep3-ba0") == 0
    assert _step("latest-rank0.pt") == -1


def test_candidates_are_checkpoints_newest_first_and_nothing_else(tmp_path: Path) -> None:
    for name in (
        "ep0-ba0-rank0.pt",
        "ep0-ba2-rank0.pt",
        "ep0-ba10-rank0.pt",
        "ep0-ba4.pt.zst",
        "ep0-ba6.tar.gz",
    ):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "ep0-ba5").mkdir()  # a sharded checkpoint
    # Not checkpoints: a temporary write, latest pointers, the quarantine, a link, other suffixes.
    for name in (".tmp-1-ep0-ba30-rank0.pt", "latest-ba40-rank0.pt", "ep0-ba7.json", "notes.pt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / QUARANTINE).mkdir()
    (tmp_path / QUARANTINE / "ep0-ba50-rank0.pt").write_bytes(b"x")
    os.symlink("ep0-ba2-rank0.pt", tmp_path / "ep0-ba60-rank0.pt")
    assert [p.name for p in _candidates(tmp_path)] == [
        "ep0-ba10-rank0.pt",
        "ep0-ba6.tar.gz",
        "ep0-ba5",
        "ep0-ba4.pt.zst",
        "ep0-ba2-rank0.pt",
        "ep0-ba0-rank0.pt",  # step 0 is a step
    ]


def test_a_quarantined_checkpoint_is_moved_named_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = save(tmp_path / "ep0-ba2-rank0.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        target = _quarantine(entry, "it is truncated", tmp_path)
    assert re.fullmatch(re.escape(str(tmp_path / QUARANTINE / "ep0-ba2-rank0.pt.")) + r"\d{8}-\d{6}", target)
    assert not entry.exists() and torch.load(target)["state"]["model"]["w"][0, 0] == 1.0
    assert caplog.messages == [f"checkpoint {entry} is broken: it is truncated; moved it to {target}"]
    # A second one joins the first in the existing quarantine folder.
    _quarantine(save(tmp_path / "ep0-ba4-rank0.pt"), "empty", tmp_path)
    assert len(list((tmp_path / QUARANTINE).iterdir())) == 2


def test_interrupted_writes_are_removed_files_and_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".tmp-7-ep0-ba4-rank0.pt").write_bytes(b"partial")
    (tmp_path / ".tmp-7-ep0-ba6").mkdir()
    (tmp_path / ".tmp-7-ep0-ba6" / "__0_0.distcp").write_bytes(b"partial")
    kept = save(tmp_path / "ep0-ba2-rank0.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        removed = remove_interrupted_writes(tmp_path)
    assert sorted(removed) == [".tmp-7-ep0-ba4-rank0.pt", ".tmp-7-ep0-ba6"]
    assert [p.name for p in tmp_path.iterdir()] == [kept.name]
    assert caplog.messages == [
        f"removed {', '.join(removed)} in {tmp_path}, left by an interrupted checkpoint write"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert remove_interrupted_writes(tmp_path) == []  # nothing left: nothing said
        assert remove_interrupted_writes(tmp_path / "absent") == []
    assert caplog.messages == []


def test_recovery_of_a_folder_that_is_not_there_does_nothing(tmp_path: Path) -> None:
    recovery = recover_checkpoint_folder(tmp_path / "absent")
    assert recovery.quarantined == [] and recovery.latest is None
    assert not (tmp_path / "absent").exists()


def test_recovery_with_a_good_newest_says_nothing_and_keeps_a_right_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(tmp_path / "ep0-ba2-rank0.pt")
    newest = save(tmp_path / "ep0-ba4-rank0.pt")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        recovery = recover_checkpoint_folder(tmp_path)  # no link yet: one is made
    assert recovery.latest == str(newest) and recovery.quarantined == []
    link = tmp_path / "latest-rank0.pt"
    assert os.readlink(link) == newest.name and caplog.messages == []
    made = link.lstat().st_ino
    assert recover_checkpoint_folder(tmp_path).latest == str(newest)
    assert link.lstat().st_ino == made  # already right: left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", link.name]


def test_recovery_past_a_broken_one_says_where_it_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = save(tmp_path / "ep0-ba2-rank0.pt")
    broken = save(tmp_path / "ep0-ba4-rank0.pt")
    os.truncate(broken, 0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        recovery = recover_checkpoint_folder(tmp_path, latest_name="latest.pt")
    assert recovery.latest == str(good)
    assert [path for path, _ in recovery.quarantined] == [str(broken)]
    assert os.readlink(tmp_path / "latest.pt") == good.name
    (target,) = (tmp_path / QUARANTINE).iterdir()
    reason = recovery.quarantined[0][1]
    assert caplog.messages == [
        f"checkpoint {broken} is broken: {reason}; moved it to {target}",
        f"autoresume continues from {good}",
    ]


def test_with_nothing_good_a_dangling_latest_link_is_removed(tmp_path: Path) -> None:
    broken = save(tmp_path / "ep0-ba2-rank0.pt")
    os.truncate(broken, 0)
    os.symlink("ep0-ba9-rank0.pt", tmp_path / "latest-rank0.pt")  # names a file that is gone
    recovery = recover_checkpoint_folder(tmp_path)
    assert recovery.latest is None and [p for p, _ in recovery.quarantined] == [str(broken)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [QUARANTINE]


def test_the_temporary_name_is_hidden_beside_the_target_and_keeps_the_suffix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []

    def record(state_dict: dict[str, Any], filename: str) -> None:
        written.append(filename)
        Path(filename).write_bytes(b"whole")

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", record)
    install_atomic_checkpoint_writes()
    composer_checkpoint._write_checkpoint_file({}, str(tmp_path / "ep0-ba4-rank0.pt.zst"))
    assert written == [str(tmp_path / f".tmp-{os.getpid()}-ep0-ba4-rank0.pt.zst")]
    assert [p.name for p in tmp_path.iterdir()] == ["ep0-ba4-rank0.pt.zst"]
    assert (tmp_path / "ep0-ba4-rank0.pt.zst").read_bytes() == b"whole"


@pytest.mark.parametrize("error", [RuntimeError("unexpected pos 128 vs 64"), OSError(errno.EIO, "I/O error")])
def test_a_failed_write_on_a_full_disk_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def half_then_fail(state_dict: dict[str, Any], filename: str) -> None:
        Path(filename).write_bytes(b"half")
        raise error

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", half_then_fail)
    install_atomic_checkpoint_writes()
    target = tmp_path / "ep0-ba4-rank0.pt"
    free = (1 << 20) - 1  # one byte under a MiB: taken for a full disk
    monkeypatch.setattr(integrity.shutil, "disk_usage", lambda path: _Usage(free))
    with pytest.raises(OSError) as info:
        composer_checkpoint._write_checkpoint_file({}, str(target))
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is error
    assert str(info.value) == (
        f"[Errno {errno.ENOSPC}] No space left on device writing the checkpoint {target} ({free} bytes free)"
    )
    assert list(tmp_path.iterdir()) == []
    # With a MiB free the disk is not full: the write's own error goes up as it is.
    monkeypatch.setattr(integrity.shutil, "disk_usage", lambda path: _Usage(1 << 20))
    with pytest.raises(type(error)) as info:
        composer_checkpoint._write_checkpoint_file({}, str(target))
    assert info.value is error and list(tmp_path.iterdir()) == []


def test_installing_twice_wraps_once_and_the_folder_is_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    synced: list[str] = []

    def record(state_dict: dict[str, Any], filename: str) -> None:
        written.append(filename)
        Path(filename).write_bytes(b"whole")

    real_fsync = integrity._fsync
    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", record)
    monkeypatch.setattr(integrity, "_fsync", lambda path: (synced.append(path), real_fsync(path)))
    install_atomic_checkpoint_writes()
    install_atomic_checkpoint_writes()
    target = tmp_path / "ep0-ba4-rank0.pt"
    composer_checkpoint._write_checkpoint_file({}, str(target))
    tmp = str(tmp_path / f".tmp-{os.getpid()}-ep0-ba4-rank0.pt")
    assert written == [tmp]  # one temporary name, not a temporary name of a temporary name
    assert synced == [tmp, str(tmp_path)]  # the file's bytes, then the folder's entry of its new name


def test_a_relative_name_is_written_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def fail(state_dict: dict[str, Any], filename: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    def usage(path: str) -> _Usage:
        asked.append(path)
        return _Usage(1 << 30)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        composer_checkpoint, "_write_checkpoint_file", composer_checkpoint._write_checkpoint_file
    )
    install_atomic_checkpoint_writes()
    composer_checkpoint._write_checkpoint_file({"x": torch.arange(3)}, "ep0-ba4-rank0.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ep0-ba4-rank0.pt"]
    assert torch.equal(torch.load(tmp_path / "ep0-ba4-rank0.pt")["x"], torch.arange(3))
    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", fail)
    monkeypatch.setattr(integrity.shutil, "disk_usage", usage)
    install_atomic_checkpoint_writes()
    with pytest.raises(OSError, match="I/O error"):
        composer_checkpoint._write_checkpoint_file({}, str(tmp_path / "sub" / "ep0-ba6-rank0.pt"))
    with pytest.raises(OSError, match="I/O error"):
        composer_checkpoint._write_checkpoint_file({}, "ep0-ba6-rank0.pt")
    assert asked == [str(tmp_path / "sub"), "."]  # the free space of the folder written to


KILLED_WRITE = """
import sys
import torch
from composer.utils import checkpoint
from handover.integrity import install_atomic_checkpoint_writes
install_atomic_checkpoint_writes()
checkpoint._write_checkpoint_file({"x": torch.arange(1000)}, sys.argv[1])
"""


def test_the_checkpoint_write_failpoint_kills_with_half_the_file_written(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MAMBA_FAILPOINT": "checkpoint_write@1"}
    target = tmp_path / "ep0-ba4-rank0.pt"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], env=env, cwd=root)
    assert done.returncode == -signal.SIGKILL
    (leftover,) = tmp_path.iterdir()  # no final name: the temporary one, cut in half
    assert re.fullmatch(r"\.tmp-\d+-ep0-ba4-rank0\.pt", leftover.name)
    reference = tmp_path / "whole.pt"  # the same object written whole, as Composer writes it (a file object)
    with reference.open("wb") as f:
        torch.save({"x": torch.arange(1000)}, f)
    assert leftover.stat().st_size == reference.stat().st_size // 2
