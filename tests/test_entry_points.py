"""Each command-line entry point started once as the real command a user types (a fresh Python
process): its ``__main__`` line reaches ``common.cli.run`` and the module imports on its own. The
options each ``--help`` names and the user mistakes are checked in process (tests/test_recipe_config.py,
``run_cli``); a process costs about 10 s of CPU for torch and Composer's imports, so these run in
make test-e2e."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_recipe_config import ENTRY_POINTS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def start(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / entry)] if entry.endswith(".py") else [sys.executable, "-m", entry]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_the_command_starts_and_explains_itself(entry: str, tmp_path: Path) -> None:
    proc = start(entry, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: "), proc.stdout
    assert ENTRY_POINTS[entry][0] in proc.stdout


def test_a_user_mistake_in_a_real_process_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = start("recipes/train.py", "missing.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: recipe file not found: missing.yaml"), proc.stderr
    assert "Traceback" not in proc.stderr
    debug = start("recipes/train.py", "missing.yaml", "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr
