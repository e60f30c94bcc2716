"""Intra-op threads per rank: affinity / local ranks, OMP_NUM_THREADS, an explicit request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from common import threads


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_affinity_divided_by_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    line = threads.configure_threads(None)
    assert torch.get_num_threads() == 1  # 6 cores // 4 ranks
    assert line.startswith("threads: 1 intra-op")
    assert "6 cores available to this process / 4 local rank(s)" in line
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads.configure_threads(None)
    assert torch.get_num_threads() == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    threads.configure_threads(None)
    assert torch.get_num_threads() == 6


def test_more_ranks_than_cores_still_gets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.decide_threads(None)[0] == 1


def test_precedence_request_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.decide_threads(None) == (2, "OMP_NUM_THREADS=2")
    line = threads.configure_threads(3)
    assert torch.get_num_threads() == 3 and "threads=3 in the config" in line


@pytest.mark.parametrize(
    ("env", "requested", "message"),
    [
        ({"LOCAL_WORLD_SIZE": "two"}, None, "LOCAL_WORLD_SIZE='two' is not an integer"),
        ({"OMP_NUM_THREADS": "lots"}, None, "OMP_NUM_THREADS='lots' is not an integer"),
        ({}, 0, "threads=0 must be >= 1"),
    ],
)
def test_bad_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], requested: int | None, message: str
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        threads.configure_threads(requested)


@pytest.mark.skipif(not os.environ.get("PYTEST_XDIST_WORKER"), reason="only under pytest-xdist (make test)")
def test_an_xdist_worker_runs_one_torch_thread_and_so_do_its_children() -> None:
    """tests/conftest.py: two workers on two cores, one thread each, passed on to subprocesses."""
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])  # 1 unless set explicitly
    code = "import torch; print(torch.get_num_threads())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == os.environ["OMP_NUM_THREADS"]
