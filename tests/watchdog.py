"""A last-resort watchdog for a test hung in native code, where pytest-timeout cannot reach it.

pytest-timeout (pyproject.toml: 300 s a test; the end-to-end tests set their own limits) fails a hung
test from a SIGALRM handler or a timer thread: Python code, which needs the GIL. A test blocked in
native code that holds the GIL never lets either run, and CI then hangs to its 90-minute limit. Seen:
a pytest worker joining Gloo's threads in ``~ProcessGroupGloo`` (under pybind11's dealloc, GIL held)
while they waited for the GIL. faulthandler's watchdog is a C thread: ``MARGIN_S`` seconds after a
test's own limit it writes every thread's Python stack to the session's real stderr (not pytest's
capture of it) and ends the process with status 1; pytest-xdist then reports that the worker crashed
while running the test, and the other tests go on.

tests/conftest.py imports the hook below; ``pytest -p tests.watchdog`` loads it on its own.
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Iterator

import pytest

MARGIN_S = float(os.environ.get("WATCHDOG_MARGIN_S", "60"))


def _real_stderr(config: pytest.Config) -> int:
    """The file descriptor of the stderr pytest started with (fd 2 itself is captured during a test)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    err = getattr(getattr(capman, "_global_capturing", None), "err", None)
    fd = getattr(err, "targetfd_save", None)
    return fd if isinstance(fd, int) else 2


def _limit(item: pytest.Item) -> float | None:
    """The test's pytest-timeout limit in seconds (its marker, else the configured one); None: no limit."""
    marker = item.get_closest_marker("timeout")
    value = marker.args[0] if marker is not None and marker.args else item.config.getoption("timeout", None)
    if value is None:
        try:
            value = item.config.getini("timeout")
        except ValueError:  # pytest-timeout is not installed
            return None
    try:
        seconds = float(value) if value not in (None, "") else 0.0
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    limit = _limit(item)
    if limit is not None:
        faulthandler.dump_traceback_later(limit + MARGIN_S, exit=True, file=_real_stderr(item.config))
    try:
        yield
    finally:
        if limit is not None:
            faulthandler.cancel_dump_traceback_later()
