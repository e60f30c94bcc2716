"""A user mistake stops every rank of a 2-process run, with the same one-line message, and nothing hangs.

The two ranks are started as the composer launcher starts them (its environment: RANK,
WORLD_SIZE, LOCAL_RANK, ..., gloo over loopback), but as two subprocesses of the test, so that
each one's exit status and output are checked on its own: the launcher would end the second
rank with SIGTERM as soon as the first exits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from data.sources import SourceSpec
from tests.conftest import tiny_overrides
from tests.data_helpers import convert_sources, make_docs, write_jsonl, write_mixture
from tests.test_train import ROOT, free_port

WSD = {"scheduler.t_warmup": "2ba", "scheduler.t_decay": 0.25, "eval_interval": "null"}

pytestmark = [pytest.mark.dist, pytest.mark.slow]
# Seconds from the moment both ranks have started (imports done): past it a rank hangs. 60 on an idle
# machine, stretched by the load of the shared 2-core machines the tests run on (load 30 = 15x).
LIMIT = 60 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
START_LIMIT = 600  # seconds for the imports on a loaded machine (this one is shared)


def run_two_ranks(overrides: list[str]) -> list[tuple[int | None, str]]:
    """(exit status or None for a hang, stderr) of each rank of ``recipes/train.py`` on 2 processes.

    The clock starts when both ranks have printed their first line (``[train] threads ...``, after
    the imports, which take minutes on a loaded 2-core machine).
    """
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, NODE_RANK=0),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        env = {k: str(v) for k, v in env.items()}
        cmd = [sys.executable, str(ROOT / "recipes/train.py"), str(ROOT / "yamls/tiny/wsd.yaml"), *overrides]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    started: list[threading.Event] = [threading.Event() for _ in procs]
    errs: list[list[str]] = [[] for _ in procs]

    def watch(i: int, proc: subprocess.Popen) -> None:
        for _ in proc.stdout:  # type: ignore[union-attr]
            started[i].set()
        started[i].set()

    def collect(i: int, proc: subprocess.Popen) -> None:
        errs[i].extend(proc.stderr)  # type: ignore[union-attr,arg-type]

    threads = [threading.Thread(target=f, args=(i, p)) for i, p in enumerate(procs) for f in (watch, collect)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + START_LIMIT
    for event in started:
        event.wait(max(0.0, deadline - time.monotonic()))
    deadline = min(deadline, time.monotonic() + LIMIT)
    results: list[tuple[int | None, str]] = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        results.append((proc.returncode if proc.returncode >= 0 else None, ""))
    for thread in threads:
        thread.join()
    return [(code, "".join(err)) for (code, _), err in zip(results, errs)]


def assert_both_stop(results: list[tuple[int | None, str]], expected: str) -> str:
    """Both ranks exit 2 with one identical ``error:`` line (no traceback); returns that line."""
    lines = []
    for rank, (code, err) in enumerate(results):
        assert code == 2, f"rank {rank}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err, f"rank {rank}:\n{err[-3000:]}"
        errors = re.findall(r"^error: .*$", err, flags=re.MULTILINE)
        assert len(errors) == 1, f"rank {rank}:\n{err[-3000:]}"
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert re.search(expected, lines[0]), lines[0]
    return lines[0]


def test_a_wrong_init_from_path_stops_both_ranks(corpus: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    results = run_two_ranks(tiny_overrides(corpus, tmp_path, **WSD, **{"init_from.path": missing}))
    assert_both_stop(results, re.escape(str(missing)))
    assert not (tmp_path / "tiny-wsd").exists()


def test_an_init_from_of_another_shape_stops_both_ranks(corpus: dict[str, Path], tmp_path: Path) -> None:
    from handover.hf_mamba import export_hf
    from models.config import MambaConfig, SSMConfig
    from models.mamba_lm import MambaLMHeadModel

    wider = MambaLMHeadModel(MambaConfig(d_model=48, n_layer=2, vocab_size=300, ssm=SSMConfig(d_state=8)))
    export_hf(wider, tmp_path / "released")
    results = run_two_ranks(
        tiny_overrides(corpus, tmp_path, **WSD, **{"init_from.path": tmp_path / "released"})
    )
    assert_both_stop(results, r"does not fit this model")


def test_a_missing_data_folder_stops_both_ranks(corpus: dict[str, Path], tmp_path: Path) -> None:
    gone = tmp_path / "deleted-stream"
    mixture = write_mixture(
        tmp_path / "mix.yaml", {"stable": {"docs": {"local": str(gone), "proportion": 1.0}}}
    )
    results = run_two_ranks(tiny_overrides(corpus, tmp_path, **WSD, **{"data.mixture": mixture}))
    assert_both_stop(results, re.escape(str(gone / "train" / "index.json")))


def test_a_corrupt_shard_seen_by_rank_1_only_stops_both_ranks(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    """The ranks of a node split the shard files to check: shard 1 is rank 1's alone."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(400, seed=1)])
    stream = tmp_path / "mds"
    convert_sources(stream, corpus["tokenizer"], [SourceSpec(path=str(docs))], shard_size="2kb")
    shards = sorted((stream / "train").glob("shard.*.mds.zstd"))
    assert len(shards) >= 2
    os.truncate(shards[1], shards[1].stat().st_size // 2)
    mixture = write_mixture(
        tmp_path / "mix.yaml", {"stable": {"docs": {"local": str(stream), "proportion": 1.0}}}
    )
    results = run_two_ranks(tiny_overrides(corpus, tmp_path, **WSD, **{"data.mixture": mixture}))
    assert_both_stop(results, re.escape(f"shard file {shards[1]} is corrupt"))
