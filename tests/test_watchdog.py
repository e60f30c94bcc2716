"""tests/watchdog.py ends a test hung in native code with the GIL held, which pytest-timeout cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SIGALRM blocked, then libc's pause() called through PyDLL (the GIL held): pytest-timeout's alarm is
# never delivered and no other Python thread runs again, as in a native deadlock.
HANG = """
import ctypes, signal

def test_hangs_in_native_code():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    ctypes.PyDLL(None).pause()
"""


def test_a_test_hung_with_the_gil_held_is_ended_with_its_stack(tmp_path: Path) -> None:
    test = tmp_path / "test_hang.py"
    test.write_text(HANG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WATCHDOG_MARGIN_S": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.watchdog",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=1",
        str(test),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Timeout (0:00:02)!" in proc.stderr, proc.stderr[-2000:]
    assert "line 6 in test_hangs_in_native_code" in proc.stderr, proc.stderr[-2000:]
