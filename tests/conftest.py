"""Shared test set-up: deterministic seeds, quiet HF, a clean process environment, and what many
tests share, built once per test session (per pytest-xdist worker):

- ``corpus`` (fixture): a 300-token tokenizer, a pre-training and a chat MDS stream (seq 32), a
  two-phase mixture. ``tiny_overrides(corpus, run_root, **extra)`` shrinks any recipe onto it.
- ``run_cli(entry, *args)``: a command-line entry point run in this process, as ``python -m entry``
  would run it (common/cli.run: exit status, one-line message, ``--help``), without starting a Python
  that imports torch and Composer again (about 10 s of CPU each). Test a user mistake or ``--help``
  this way; tests/test_entry_points.py (make test-e2e) starts each entry point once as a real process.
- ``StopAfter(batches)``: a callback that ends training after that many batches.
- ``sharded_and_full`` (fixture): a ``composer -n 2`` run's sharded and full checkpoints, trained once
  per test session and shared by the pytest-xdist workers (make test-e2e).

Keep anything one of these builds read-only in a test: copy it into ``tmp_path`` to change it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from tests.watchdog import pytest_runtest_protocol  # noqa: F401  (a hook: registered from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Under pytest-xdist (make test: 2 workers on 2 cores) each worker, and every process it starts
# (the recipes read OMP_NUM_THREADS, common/threads.py), runs one torch thread, so that workers do not
# fight over the cores in OpenMP barriers. The fused CPU scan splits its work over
# torch.get_num_threads() threads, so it follows. An explicit OMP_NUM_THREADS is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


E2E_TIMEOUT = 900  # seconds per end-to-end test (marker slow); the others have pyproject.toml's timeout


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # A test that launches several processes is end to end: make test-e2e runs it, not make test.
        if "dist" in item.keywords and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
        if "slow" in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 300-token tokenizer, a pre-training stream and a chat stream (seq 32), a two-phase mixture."""
    from data.sources import SourceSpec
    from tests.data_helpers import (
        convert_sources,
        make_chats,
        make_docs,
        make_tokenizer,
        write_jsonl,
        write_mixture,
    )

    root = tmp_path_factory.mktemp("corpus")
    tok = make_tokenizer(root / "tok", vocab_size=300)
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in make_docs(400, seed=1)])
    chats = write_jsonl(root / "chat.jsonl", [{"messages": m} for m in make_chats(60, seed=2)])
    convert_sources(root / "mds" / "docs", tok, [SourceSpec(path=str(docs))], val_fraction=0.1)
    convert_sources(
        root / "mds" / "chat", tok, [SourceSpec(path=str(chats), format="chat")], val_fraction=0.1
    )
    mixture = write_mixture(
        root / "mix.yaml",
        {
            "stable": {"docs": {"local": str(root / "mds" / "docs"), "proportion": 1.0}},
            "decay": {
                "docs": {"local": str(root / "mds" / "docs"), "repeat": 0.5},
                "chat": {"local": str(root / "mds" / "chat"), "repeat": 1.0},
            },
        },
    )
    return {"tokenizer": tok, "mixture": mixture, "root": root}


def session_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this test session that every pytest-xdist worker shares (each worker has a
    temporary folder of its own; their parent is the session's), with ``name``."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / name


@pytest.fixture(scope="session")
def sharded_and_full(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 4-batch ``composer -n 2`` FSDP2 run twice: its sharded (DCP) checkpoint in
    ``sharded/`` and a full one, the reference, in ``full/`` (tests.test_handover_dist's
    ``train_sharded_and_full``). Trained once per test session: the first worker to ask trains,
    the others wait on the lock and read the same folders."""
    from filelock import FileLock

    from tests.test_handover_dist import train_sharded_and_full

    root = session_folder(tmp_path_factory, "sharded-and-full")
    with FileLock(f"{root}.lock"):
        if not (root / "done").is_file():
            root.mkdir(exist_ok=True)
            train_sharded_and_full(corpus, root)
            (root / "done").touch()
    return root


def tiny_overrides(corpus: dict[str, Path], run_root: Path, **extra: object) -> list[str]:
    """Command-line overrides that shrink any recipe to a tiny model on the ``corpus`` fixture."""
    settings = {
        "run_root": run_root,
        "tokenizer": corpus["tokenizer"],
        "data.mixture": corpus["mixture"],
        "model.d_model": 32,
        "model.n_layer": 2,
        "model.ssm.d_state": 8,
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 8,
        "max_duration": "8ba",
        "eval_interval": "4ba",
        "eval_subset_num_batches": 2,
        "checkpoint.save_interval": "2ba",
        "logging.progress_bar": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


# ``tiny_overrides`` extras for a two-block Mamba-2-attention hybrid (block 1 is attention) trained for
# two batches, its decay in the second.
TINY_HYBRID = {
    "run_name": "hybrid",
    "max_duration": "2ba",
    "eval_interval": "null",
    "model.d_intermediate": 64,
    "model.attn_layer_idx": "[1]",
    "model.attn.num_heads": 4,
    "model.ssm.layer": "mamba2",
    "model.ssm.headdim": 16,
    "model.ssm.chunk_size": 8,
    "scheduler.t_decay": "1ba",
    "scheduler.t_warmup": "0ba",
}


@dataclass(frozen=True)
class CliResult:
    """What a command-line run left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(entry: str, *args: str) -> CliResult:
    """Runs ``entry`` (a module, ``data.convert``, or a script, ``recipes/train.py``) with ``args`` in
    this process through ``common.cli.run``, as its ``if __name__ == "__main__"`` line does, and returns
    the exit status and the output. Relative paths are read from the current directory (use
    ``monkeypatch.chdir``). With ``--debug``, a user mistake propagates as the exception itself (the
    traceback a user would see): check it with ``pytest.raises``."""
    from common import cli

    module = importlib.import_module(entry.removesuffix(".py").replace("/", "."))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.run(module.main, list(args))
        except SystemExit as stop:
            code = stop.code
        else:  # cli.run always exits
            raise AssertionError(f"common.cli.run({entry}) returned instead of exiting")
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return CliResult(returncode, stdout.getvalue(), stderr.getvalue())


class StopAfter(Callback):
    """Ends training after ``batches`` batches, as the last callback of the event, so that the schedule
    keeps the run's ``max_duration`` for those batches (``fit(duration=...)`` would replace it)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) >= self.batches:
            state.stop_training()
