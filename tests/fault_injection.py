"""Fault injection: kill, corrupt, fill the disk, poison with NaN; then run the same command again.

    python -m tests.fault_injection [--seed 0] [--workdir DIR] [--jobs N] [--only CASE ...]
                                    [--multinode]                     (make test-faults)

On a tiny corpus and a shrunk ``yamls/tiny/wsd.yaml`` (12 batches of 8 x 32 tokens, checkpoints
every 2 batches, the pre-decay checkpoint at batch 9, evaluation every 4), each fault is a real
process killed with SIGKILL, or a file broken on purpose, and recovery is the very command that
was running, started again. What a recovered run must show, against an uninterrupted reference
run of the same command:

- its final weights equal the reference's bit for bit (CPU, fp32, same seed);
- every training sample trained exactly once: the per-batch sample ids (``callbacks.sample_audit``)
  equal the reference's, so no sample is lost or duplicated;
- every checkpoint left beside it loads (broken ones moved to ``quarantine/``).

A bad input (a corrupt shard, a token outside the vocabulary, a broken config) must be rejected
with one clear message, before anything is written where that is possible; a run must never hang
(every process has a time limit). Kill points are seeded: ``--seed`` draws other batches and
delays. The groups of faults (``CASES``; ``--only`` picks some) run ``--jobs`` at a time (twice
the number of cores: a group's processes leave a core idle much of the time, waiting on process
starts, launchers and fsync), each with a /dev/shm of its own. One group kills a node of a 2-node run whose
checkpoints are on an object store (``Suite.multinode``); ``--multinode`` adds the same kill with
the checkpoints in a shared folder. The table at the end has one line per kind of fault; the exit
status is 1 unless every line reads all recovered or rejected, zero lost, zero duplicated, zero
hangs. Samples whose updates
the loss-spike rollback discards by design have their own column ("rolled back by design"), never
counted as trained, so a sample really lost cannot hide among them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.sample_audit import read_audit  # noqa: E402
from handover.integrity import checkpoint_problem  # noqa: E402
from handover.weights import read_weights  # noqa: E402
from tests.data_helpers import make_docs, make_tokenizer, write_jsonl, write_mixture  # noqa: E402
from tests.s3_server import BUCKET, moto_s3  # noqa: E402

TIMEOUT = 240  # seconds for one process on an idle machine: past it, the run counts as a hang
BATCHES = 12
# Two nodes of two processes on loopback (``Suite.multinode``): 4 batches of 8 samples, sharded
# checkpoints every 2, one node killed after batch 2 or 3. The launch of 4 processes on 2 shared cores
# is slow: a longer limit. After a node is killed the others must exit within SURVIVOR_TIMEOUT
# (Composer's 300 s process-group timeout, then the launcher's 30 s before SIGKILL, and a margin),
# or they count as hung.
NODES, NPROC_PER_NODE, MULTINODE_BATCHES, MULTINODE_TIMEOUT, SURVIVOR_TIMEOUT = 2, 2, 4, 900, 360
# Each node in its own mount namespace with its own /dev/shm (and TMPDIR), as on two machines:
# Streaming names its shared memory per node, so two nodes on one machine would collide.
OWN_SHM = [
    *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
    'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"',
    "node",
]


def stretch() -> float:
    """How much longer than on an idle machine a run may take now: the load average per core
    (between 1 and 10). The suite runs on shared machines; a hang still ends as one."""
    return max(1.0, min(10.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


def shm_of(folder: Path) -> list[str]:
    """The prefix that runs a command with ``folder`` (under the machine's /dev/shm) as its /dev/shm.

    Groups of faults run side by side, and other jobs may share the machine: Streaming picks its
    shared-memory names per machine, and two unrelated runs starting together can collide. Each
    group has a folder of its own that outlives its runs, as /dev/shm outlives a killed run.
    """
    return [
        *("unshare", "--mount", "--propagation", "private", "sh", "-c"),
        'mount --bind "$0" /dev/shm && exec "$@"',
        str(folder),
    ]


@dataclass
class Row:
    """One line of the table."""

    faults: int = 0
    recovered: int = 0
    lost: int = 0
    rolled_back: int = 0  # samples whose updates the loss-spike rollback discarded by design
    duplicated: int = 0
    rejected: int = 0
    hangs: int = 0
    failures: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.failures or self.lost or self.duplicated or self.hangs)

    def __add__(self, other: Row) -> Row:
        """Two groups' counts of the same kind of fault, on one line."""
        counts = {
            f: getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__ if f != "failures"
        }
        return Row(**counts, failures=self.failures + other.failures)


@dataclass
class Outcome:
    returncode: int | None  # None: it hung past TIMEOUT
    output: str


class Suite:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.seed = seed
        # Each group of faults (``run_case``) has its own table rows and its own random draws, seeded
        # by its name: the same kill points whichever groups run, and in whichever order or thread.
        self.case = threading.local()
        self.reference_locks: dict[int | str, threading.Lock] = {}
        self.locks_lock = threading.Lock()
        self.shm_root = Path("/dev/shm") / f"fault-suite-{os.getpid()}"
        (self.shm_root / "setup").mkdir(parents=True)
        self.own_shm = (
            subprocess.run([*shm_of(self.shm_root / "setup"), "true"], capture_output=True).returncode == 0
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.env.pop("MAMBA_FAILPOINT", None)
        # Uninterrupted runs by number of processes (``"multinode"``: the 2-node run): weights, audit.
        self.references: dict[int | str, tuple[dict[str, torch.Tensor], dict[int, dict[int, list[int]]]]] = {}

    @property
    def rng(self) -> random.Random:
        return self.case.rng

    @property
    def rows(self) -> dict[str, Row]:
        return self.case.rows

    def run_case(self, name: str, case: Callable[[Suite], None]) -> dict[str, Row]:
        """Run one group of faults (in this thread); its table rows."""
        self.case.rng, self.case.rows = random.Random(f"{self.seed}:{name}"), {}
        self.case.shm = self.shm_root / name
        self.case.shm.mkdir()
        began = time.monotonic()
        case(self)
        print(f"[{name}] done in {time.monotonic() - began:.0f} s", flush=True)
        return self.case.rows

    def once(self, key: int | str) -> threading.Lock:
        """The lock under which the reference ``key`` is built (one thread builds it, others wait)."""
        with self.locks_lock:
            return self.reference_locks.setdefault(key, threading.Lock())

    # -- set-up ---------------------------------------------------------------------------------

    def corpus(self) -> None:
        self.tok = make_tokenizer(self.work / "tok", vocab_size=300)
        self.docs = write_jsonl(self.work / "docs.jsonl", [{"text": t} for t in make_docs(600, seed=3)])
        out = self.run(self.convert_command(self.work / "mds", "--val-fraction", "0.1"))
        if out.returncode != 0:
            raise SystemExit(f"converting the corpus failed:\n{out.output[-3000:]}")
        self.mixture = write_mixture(
            self.work / "mix.yaml", {"stable": {"docs": {"local": str(self.work / "mds"), "proportion": 1.0}}}
        )

    def convert_command(self, out: Path, *extra: str) -> list[str]:
        """``data.convert`` of the test corpus into ``out`` (32-token samples), with ``extra`` options."""
        return [
            *(sys.executable, "-m", "data.convert", "--tokenizer", str(self.tok), "--seq-len", "32"),
            *("--source", str(self.docs), "--out", str(out), *extra),
        ]

    def overrides(
        self, run_root: Path, nproc: int, mixture: Path | None = None, **extra: object
    ) -> list[str]:
        settings: dict[str, object] = {
            "run_root": run_root,
            "run_name": "run",
            "tokenizer": self.tok,
            "data.mixture": mixture or self.mixture,
            "model.d_model": 32,
            "model.n_layer": 2,
            "model.ssm.d_state": 8,
            "global_train_batch_size": 8,
            "device_train_microbatch_size": 4,
            "device_eval_batch_size": 8,
            "max_duration": f"{BATCHES}ba",
            "eval_interval": "4ba",
            "eval_subset_num_batches": 2,
            "scheduler.t_warmup": "2ba",
            "scheduler.t_decay": 0.25,
            "checkpoint.save_interval": "2ba",
            "callbacks.sample_audit": "{}",
            "logging.progress_bar": False,
            "fsdp.state_dict_type": "full",
            **extra,
        }
        return [f"{k}={v}" for k, v in settings.items()]

    def command(self, run_root: Path, nproc: int, **extra: object) -> list[str]:
        script, recipe = str(ROOT / "recipes" / "train.py"), str(ROOT / "yamls" / "tiny" / "wsd.yaml")
        args = [script, recipe, *self.overrides(run_root, nproc, **extra)]
        if nproc == 1:
            return [sys.executable, *args]
        port = str(free_port())
        return [str(Path(sys.executable).parent / "composer"), "-n", str(nproc), "--master_port", port, *args]

    # -- running --------------------------------------------------------------------------------

    def run(
        self,
        cmd: list[str],
        failpoint: str | None = None,
        kill_when: Callable[[], bool] | None = None,
        shm: Path | None = None,
    ) -> Outcome:
        """Run ``cmd`` to its end, or SIGKILL its whole process group once ``kill_when()`` holds.

        Its /dev/shm is ``shm``, else its group's (where the runs killed before it left theirs), and
        so is its temporary folder: Streaming keeps file locks there (``{prefix}_barrier_filelock``)
        and each rank skips the shared-memory prefixes that have one, so a lock another group
        creates between two ranks' scans makes them pick different prefixes ("shared memory
        prefix=... was not registered by local leader"; seen once with four groups at a time).
        """
        env = dict(self.env)
        if failpoint:
            env["MAMBA_FAILPOINT"] = failpoint
        folder = shm or getattr(self.case, "shm", self.shm_root / "setup")
        tmp = self.work / "tmp" / folder.name
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
        if self.own_shm:
            cmd = [*shm_of(folder), *cmd]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        start, limit = time.monotonic(), TIMEOUT * stretch()
        while proc.poll() is None:
            if time.monotonic() - start > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return Outcome(None, proc.stdout.read().decode(errors="replace"))
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        return Outcome(proc.returncode, proc.stdout.read().decode(errors="replace"))

    def reference(self, nproc: int) -> tuple[dict[str, torch.Tensor], dict[int, dict[int, list[int]]]]:
        """The uninterrupted run of ``nproc`` processes (weights, sample audit), run once when first asked for."""
        with self.once(nproc):
            if nproc not in self.references:
                root = self.work / f"reference-{nproc}"
                # A /dev/shm of its own: the reference is what the faults are compared with, so no
                # leftover of the killed runs in the group that first asks for it may reach it.
                shm = self.shm_root / root.name
                shm.mkdir()
                out = self.run(self.command(root, nproc), shm=shm)
                if out.returncode != 0:
                    raise SystemExit(f"the uninterrupted reference run failed:\n{out.output[-3000:]}")
                self.references[nproc] = (
                    model_weights(root / "run" / "checkpoints" / "latest-rank0.pt"),
                    audits(root),
                )
        return self.references[nproc]

    # -- checks ---------------------------------------------------------------------------------

    def check_recovered(
        self, row: Row, name: str, root: Path, nproc: int, out: Outcome, ckpt_dir: Path | None = None
    ) -> None:
        if out.returncode is None:
            row.hangs += 1
            row.failures.append(f"{name}: the recovery run hung")
            return
        if out.returncode != 0:
            row.failures.append(
                f"{name}: the recovery run failed (exit {out.returncode}):\n{out.output[-2000:]}"
            )
            return
        failures = len(row.failures)
        weights, audit = self.reference(nproc)
        lost, duplicated, rolled_back, same_order = compare_audits(audit, audits(root))
        assert rolled_back == 0  # no rollback configured: every audited batch counts as trained
        row.lost += lost
        row.duplicated += duplicated
        if not same_order:
            row.failures.append(f"{name}: the batches hold other samples than the uninterrupted run's")
        folder = ckpt_dir or root / "run" / "checkpoints"
        mine = model_weights(folder / "latest-rank0.pt")
        if mine.keys() != weights.keys() or not all(torch.equal(mine[k], weights[k]) for k in weights):
            row.failures.append(f"{name}: final weights differ from the uninterrupted run's")
        broken = [str(p) for p in checkpoints(folder) if checkpoint_problem(p)]
        if broken:
            row.failures.append(f"{name}: broken checkpoints left outside quarantine: {broken}")
        if not (folder / "pre-decay" / "pre-decay-ba9.pt").is_file():
            row.failures.append(f"{name}: no pre-decay checkpoint")
        if len(row.failures) == failures:
            row.recovered += 1

    def kill_and_recover(
        self,
        row: Row,
        name: str,
        nproc: int,
        failpoint: str | None = None,
        kill_when: Callable[[Path], Callable[[], bool]] | None = None,
        before_recovery: Callable[[Path], None] | None = None,
    ) -> None:
        root = self.work / name
        cmd = self.command(root, nproc)
        out = self.run(cmd, failpoint=failpoint, kill_when=kill_when(root) if kill_when else None)
        row.faults += 1
        if out.returncode is None:
            row.hangs += 1
            row.failures.append(f"{name}: hung before the kill")
            return
        if out.returncode == 0:
            row.failures.append(f"{name}: the fault did not happen (the run finished first)")
            return
        if before_recovery is not None:
            before_recovery(root)
        self.check_recovered(row, name, root, nproc, self.run(cmd))

    def reject(
        self,
        row: Row,
        name: str,
        cmd: list[str],
        expect: str,
        code: int,
        nothing_written: Path | None = None,
        env: dict | None = None,
    ) -> None:
        """A bad input: the command must exit ``code`` with ``expect`` in its output, without a traceback."""
        row.faults += 1
        out = self.run(cmd)
        if out.returncode is None:
            row.hangs += 1
            row.failures.append(f"{name}: hung instead of failing")
        elif out.returncode != code or expect not in out.output or "Traceback" in out.output:
            row.failures.append(
                f"{name}: expected exit {code} with {expect!r}, got exit {out.returncode}:\n{out.output[-2000:]}"
            )
        elif nothing_written is not None and nothing_written.exists():
            row.failures.append(f"{name}: {nothing_written} was written")
        else:
            row.rejected += 1

    # -- the faults -----------------------------------------------------------------------------

    def kills(self, nproc: int, count: int, first: int = 0) -> None:
        """``count`` kills at seeded batches of an ``nproc``-process run (runs ``kill-{nproc}-{first}``...)."""
        row = self.rows.setdefault(f"kill mid-step ({nproc} process{'es' if nproc > 1 else ''})", Row())
        for i in range(first, first + count):
            batch, delay = self.rng.randrange(1, BATCHES - 1), self.rng.uniform(0.0, 0.3)
            self.kill_and_recover(
                row,
                f"kill-{nproc}-{i}",
                nproc,
                kill_when=lambda root, b=batch, d=delay: after_batch(root, b, d),
            )

    def failpoint_kills(self, group: str) -> None:
        """The kills at named points of the code (``common/failpoints.py``) of one ``FAILPOINTS`` group."""
        for label, nproc, specs in FAILPOINTS[group]:
            row = self.rows.setdefault(f"{label} ({nproc} process{'es' if nproc > 1 else ''})", Row())
            for spec in specs:
                self.kill_and_recover(
                    row,
                    f"fp-{nproc}-{spec.replace('@', '-').replace(':', '-').replace('=', '')}",
                    nproc,
                    failpoint=spec,
                )

    def conversion_kills(self) -> None:
        row = self.rows.setdefault("kill mid-conversion", Row())
        reference = self.work / "conv-reference"

        def convert(out: Path) -> list[str]:
            return self.convert_command(out, "--batch-bytes", "2000")

        if self.run(convert(reference)).returncode != 0:
            raise SystemExit("the reference conversion failed")
        for i, spec in enumerate(["convert_chunk@2", "convert_chunk@9"]):
            out_dir = self.work / f"conv-{i}"
            row.faults += 1
            killed = self.run(convert(out_dir), failpoint=spec)
            if killed.returncode != -signal.SIGKILL:
                row.failures.append(f"conversion {spec}: not killed (exit {killed.returncode})")
                continue
            if out_dir.exists():
                row.failures.append(f"conversion {spec}: {out_dir} exists after the kill: it looks complete")
                continue
            again = self.run(convert(out_dir))
            if again.returncode != 0:
                row.failures.append(f"conversion {spec}: the rerun failed:\n{again.output[-2000:]}")
                continue
            lost, dup = compare_shards(reference, out_dir)
            row.lost, row.duplicated = row.lost + lost, row.duplicated + dup
            if not (lost or dup):
                row.recovered += 1

    def broken_checkpoints(self) -> None:
        row = self.rows.setdefault("corrupt checkpoint (1 process)", Row())
        breakers = {
            "truncated": lambda p: os.truncate(p, p.stat().st_size // 3),
            "emptied": lambda p: os.truncate(p, 0),
            "flipped byte": flip_middle_byte,
        }
        for name, breaker in breakers.items():

            def before(root: Path, breaker=breaker) -> None:
                newest = max(
                    root.glob("run/checkpoints/ep*-ba*-rank0.pt"),
                    key=lambda p: int(p.name.split("ba")[1].split("-")[0]),
                )
                breaker(newest)

            # Killed after batch 7 (checkpoints up to 6); the newest one is then broken on purpose.
            self.kill_and_recover(
                row, f"ckpt-{name.replace(' ', '-')}", 1, failpoint="batch_end@7", before_recovery=before
            )

    def bad_data(self) -> None:
        row = self.rows.setdefault("corrupt or foreign data", Row())
        cases: list[tuple[str, Callable[[Path], None], str]] = [
            (
                "zstd byte flipped",
                lambda mds: flip_middle_byte(mds / "train" / "shard.00000.mds.zstd"),
                "is corrupt or unreadable",
            ),
            (
                "shard byte flipped after unpacking",
                # In the first sample the run trains (a flip in a sample never read is never trained on).
                lambda mds: flip_unpacked(mds, self.reference(1)[1][0][0][0]),
                "checksum does not match",
            ),
            ("token outside the vocabulary", write_out_of_vocab, "outside the tokenizer's 300 ids"),
        ]
        for name, breaker, expect in cases:
            mds = self.work / f"data-{name.replace(' ', '-')}"
            # The converted stream as data.convert wrote it (not the shards earlier runs unpacked).
            shutil.copytree(self.work / "mds", mds, ignore=shutil.ignore_patterns("*.mds"))
            breaker(mds)
            mixture = write_mixture(
                mds.with_suffix(".yaml"), {"stable": {"docs": {"local": str(mds), "proportion": 1.0}}}
            )
            root = self.work / f"run-{mds.name}"
            self.reject(row, name, self.command(root, 1, mixture=mixture), expect, 3)

    def bad_config(self) -> None:
        row = self.rows.setdefault("bad configuration", Row())
        root = self.work / "bad-config"
        cases = [
            (
                "vocabulary smaller than the tokenizer's",
                {"model.vocab_size": 200},
                "smaller than the tokenizer's 300 tokens",
            ),
            ("unknown key and wrong type", {"optimzer.lr": 1, "model.d_model": "wide"}, "2 problems"),
            ("schedule longer than the run", {"scheduler.t_warmup": "20ba"}, "exceed t_max"),
        ]
        for name, extra, expect in cases:
            self.reject(row, name, self.command(root, 1, **extra), expect, 2, nothing_written=root / "run")
        # A finished run re-run with another model width: refused before anything is touched.
        self.reference(1)
        done = self.work / "reference-1"
        before = (done / "run" / "run.json").read_bytes()
        self.reject(
            row,
            "checkpoint of another shape",
            self.command(done, 1, **{"model.d_model": 48}),
            "in the checkpoint but",
            2,
        )
        if (done / "run" / "run.json").read_bytes() != before:
            row.failures.append("checkpoint of another shape: the finished run's run.json was overwritten")
        again = self.run(self.command(done, 1))
        if again.returncode != 0 or "already complete" not in again.output:
            row.failures.append(
                f"re-running a finished run: expected 'already complete', got:\n{again.output[-1500:]}"
            )

    def nan(self) -> None:
        row = self.rows.setdefault("NaN loss", Row())
        # Policy stop: exit 3, nothing saved past the last good checkpoint, the same command then finishes.
        root = self.work / "nan-stop"
        cmd = self.command(root, 1)
        row.faults += 1
        out = self.run(cmd, failpoint="nan_loss@5")
        if out.returncode != 3 or "not finite at batch 4" not in out.output:
            row.failures.append(
                f"nan (stop): expected exit 3 naming batch 4, got {out.returncode}:\n{out.output[-1500:]}"
            )
        else:
            row.rejected += 1
            if any(checkpoint_batch(p) > 4 for p in checkpoints(root / "run" / "checkpoints")):
                row.failures.append("nan (stop): a checkpoint after the NaN batch was written")
            self.check_recovered(row, "nan-stop", root, 1, self.run(cmd))
        # Policy rollback: the loss-spike callback restores the last good checkpoint and skips the data.
        root = self.work / "nan-rollback"
        row.faults += 1
        spike = {"callbacks.loss_spike.warmup_batches": 2, "callbacks.loss_spike.window": 4}
        out = self.run(self.command(root, 1, **spike), failpoint="nan_loss@5")
        if out.returncode != 0:
            row.failures.append(f"nan (rollback): the run failed:\n{out.output[-1500:]}")
            return
        folder = root / "run" / "checkpoints"
        bad = [
            str(p)
            for p in checkpoints(folder)
            if any(not torch.isfinite(t).all() for t in model_weights(p).values())
        ]
        events = [json.loads(line) for line in (folder / "loss_spikes.jsonl").read_text().splitlines()]
        skipped = {b for e in events if e["event"] == "rollback" for b in range(*e["skipped"]["batch"])}
        # The rollback does not replay data: the skipped batches' samples are audited but their updates
        # were discarded. They count as rolled back, never as trained, so a sample lost elsewhere shows.
        lost, duplicated, rolled_back, same_order = compare_audits(
            self.reference(1)[1], audits(root), rolled_back=skipped
        )
        row.lost, row.duplicated = row.lost + lost, row.duplicated + duplicated
        row.rolled_back += rolled_back
        expected = sum(
            len(self.reference(1)[1][rank].get(b, [])) for rank in self.reference(1)[1] for b in skipped
        )
        if rolled_back != expected:
            row.failures.append(
                f"nan (rollback): {rolled_back} samples rolled back, the skipped batches hold {expected}"
            )
        if bad or 4 not in skipped or not same_order:
            row.failures.append(f"nan (rollback): non-finite checkpoints {bad}, rollbacks {events}")
        else:
            row.recovered += 1

    def nan_after_rollbacks(self) -> None:
        """A NaN that comes back after every loss-spike rollback: one ``stopped:`` line, exit 3."""
        row = self.rows.setdefault("NaN after every rollback", Row())
        spike = {
            "callbacks.loss_spike.warmup_batches": 2,
            "callbacks.loss_spike.window": 4,
            "callbacks.loss_spike.max_retries": 2,
        }
        row.faults += 1
        out = self.run(self.command(self.work / "nan-persists", 1, **spike), failpoint="nan_loss@5+")
        if out.returncode is None:
            row.hangs += 1
            row.failures.append("nan after rollbacks: hung")
        elif (
            out.returncode != 3
            or "stopped: training stopped: loss nan" not in out.output
            or "Traceback" in out.output
        ):
            row.failures.append(
                f"nan after rollbacks: expected exit 3 and one 'stopped:' line, got {out.returncode}:\n"
                f"{out.output[-1500:]}"
            )
        else:
            row.rejected += 1

    def pre_decay_leftovers(self) -> None:
        """A kill mid pre-decay write (its 5th checkpoint write): the restart sweeps the temporary file."""
        row = self.rows.setdefault("kill mid-pre-decay write, temp file swept (1 process)", Row())
        name = "pre-decay-sweep"
        root = self.work / name
        cmd = self.command(root, 1)
        row.faults += 1
        killed = self.run(cmd, failpoint="checkpoint_write@5")
        pre_decay = root / "run" / "checkpoints" / "pre-decay"
        if killed.returncode != -signal.SIGKILL or not list(pre_decay.glob(".tmp-*")):
            row.failures.append(
                f"{name}: expected a kill leaving a temporary file in {pre_decay}, got exit {killed.returncode}"
            )
            return
        self.check_recovered(row, name, root, 1, self.run(cmd))
        left = [p.name for p in pre_decay.glob(".tmp-*")]
        if left:
            row.failures.append(f"{name}: the restart left {left} in {pre_decay}")
            row.recovered -= 1

    def deleted_local_shard(self) -> None:
        """A shard file of a local stream deleted: named as missing, with the fix, before anything is written."""
        row = self.rows.setdefault("deleted shard of a local stream", Row())
        mds = self.work / "data-deleted-shard"
        shutil.copytree(self.work / "mds", mds, ignore=shutil.ignore_patterns("*.mds"))
        (mds / "train" / "shard.00000.mds.zstd").unlink()
        mixture = write_mixture(
            mds.with_suffix(".yaml"), {"stable": {"docs": {"local": str(mds), "proportion": 1.0}}}
        )
        root = self.work / "run-deleted-shard"
        expect = "is missing; the stream is local, with no remote copy to download it from"
        self.reject(row, "deleted shard", self.command(root, 1, mixture=mixture), expect, 2, root / "run")

    def disk_full(self) -> None:
        row = self.rows.setdefault("disk full", Row())
        mount = self.work / "small-disk"
        mount.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True
        ).returncode:
            row.failures.append("cannot mount a size-limited tmpfs (needs root): disk-full faults not run")
            return
        try:
            # Conversion onto a full disk: a clear error and no output that looks complete.
            out_dir = mount / "mds"
            self.reject(row, "conversion", self.convert_command(out_dir), "No space left on device", 3)
            if out_dir.exists() or list(mount.glob(".mds.*")):
                row.failures.append("disk full (conversion): output or temporary folder left behind")
            # Checkpoints onto a full disk: the run stops, nothing half-written is left, and once space
            # is freed (a larger disk) the same command continues from the last good checkpoint.
            subprocess.run(["mount", "-o", "remount,size=600k", str(mount)], check=True)
            root = self.work / "disk-full"
            cmd = self.command(root, 1, **{"checkpoint.save_folder": mount / "ckpt"})
            row.faults += 1
            out = self.run(cmd)
            if out.returncode in (0, None) or "No space left on device" not in out.output:
                row.failures.append(
                    f"disk full (checkpoint): expected a failure on ENOSPC, got {out.returncode}:\n{out.output[-1500:]}"
                )
                return
            leftovers = [p.name for p in (mount / "ckpt").glob(".tmp-*")] + [
                str(p) for p in checkpoints_in(mount / "ckpt") if checkpoint_problem(p)
            ]
            if leftovers:
                row.failures.append(f"disk full (checkpoint): partial files left: {leftovers}")
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            self.check_recovered(row, "disk-full", root, 1, self.run(cmd), ckpt_dir=mount / "ckpt")
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)

    # -- many nodes -----------------------------------------------------------------------------

    def multinode_command(self, node_root: Path, node: int, port: int, save_folder: str) -> list[str]:
        """Node ``node`` of a 2-node x 2-process ``composer`` launch: FSDP2, sharded checkpoints in
        ``save_folder`` (a folder both nodes see, or an object store), its own run folder."""
        settings = self.overrides(
            node_root,
            NODES * NPROC_PER_NODE,
            **{
                "global_train_batch_size": 8,
                "device_train_microbatch_size": 2,
                "max_duration": f"{MULTINODE_BATCHES}ba",
                "eval_interval": "null",
                "checkpoint.save_folder": save_folder,
                "checkpoint.remote_poll_seconds": 0.5,  # the latest link's check (Composer: 30 s)
                "checkpoint.pre_decay": "false",
                "fsdp.state_dict_type": "sharded",
                "threads": 1,
            },
        )
        launcher = [
            *(str(Path(sys.executable).parent / "composer"), "--world_size", str(NODES * NPROC_PER_NODE)),
            *("--nproc", str(NPROC_PER_NODE), "--node_rank", str(node)),
            *("--master_addr", "127.0.0.1", "--master_port", str(port)),
        ]
        return [
            *launcher,
            str(ROOT / "recipes" / "train.py"),
            str(ROOT / "yamls" / "tiny" / "wsd.yaml"),
            *settings,
        ]

    def multinode_reference(self) -> tuple[dict[str, torch.Tensor], dict[int, dict[int, list[int]]]]:
        """The uninterrupted 2-node run (checkpoints in a folder both nodes share), run once."""
        with self.once("multinode"):
            if "multinode" not in self.references:
                ref_root = self.work / "multinode-reference"
                outcomes, _ = self.run_nodes(ref_root, str(ref_root / "shared" / "checkpoints"), {})
                if any(o.returncode != 0 for o in outcomes):
                    raise SystemExit(
                        "the uninterrupted multi-node reference failed:\n"
                        + "\n".join(o.output[-2000:] for o in outcomes)
                    )
                self.references["multinode"] = (
                    read_weights(ref_root / "shared" / "checkpoints").state_dict,
                    node_audits(ref_root),
                )
        return self.references["multinode"]

    def run_nodes(
        self,
        root: Path,
        save_folder: str,
        env: dict[str, str],
        kill_node: int | None = None,
        kill_when: Callable[[], bool] | None = None,
    ) -> tuple[list[Outcome], float | None]:
        """Start every node's launcher (each in its own folder and process group) and wait for all.

        With ``kill_node``, that node's launcher group is SIGKILLed once ``kill_when()`` holds.
        Returns each node's outcome (None: still running after MULTINODE_TIMEOUT, or SURVIVOR_TIMEOUT
        after the kill) and the seconds from the kill to the last surviving launcher's exit.
        """
        port = free_port()
        procs, logs = [], []
        for node in range(NODES):
            folder = root / f"node{node}"
            folder.mkdir(parents=True, exist_ok=True)
            logs.append((folder / "launcher.log").open("ab"))
            (folder / "tmp").mkdir(exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [*OWN_SHM, *self.multinode_command(folder, node, port, save_folder)],
                    cwd=folder,  # a remote checkpoint is cached under the working folder: one per node
                    env={**self.env, **env, "TMPDIR": str(folder / "tmp")},
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        start, killed_at, hung, slower = time.monotonic(), None, set(), stretch()
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if (
                (now - start > MULTINODE_TIMEOUT * slower)
                if killed_at is None
                else (now - killed_at > SURVIVOR_TIMEOUT * slower)
            ):
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        hung.add(i)
                        os.killpg(p.pid, signal.SIGKILL)
                break
            if killed_at is None and kill_node is not None and kill_when is not None and kill_when():
                os.killpg(procs[kill_node].pid, signal.SIGKILL)
                killed_at = time.monotonic()
            time.sleep(0.01)
        for p in procs:
            p.wait()
        survivor_exit = None if killed_at is None else time.monotonic() - killed_at
        outcomes = []
        for i, (p, log) in enumerate(zip(procs, logs)):
            log.close()
            text = (root / f"node{i}" / "launcher.log").read_text(errors="replace")
            outcomes.append(Outcome(None if i in hung else p.returncode, text))
        return outcomes, survivor_exit

    def multinode(
        self,
        stores: tuple[str, ...] = ("object store", "shared folder"),
        seed_batches: tuple[int, int] = (2, MULTINODE_BATCHES),
    ) -> None:
        """Two nodes of two processes on loopback: an uninterrupted reference with its checkpoints
        in a folder both nodes share, then one node SIGKILLed mid-run (checkpoints on an object
        store, then in the shared folder); both nodes are started again with the same command and
        must end with the reference's weights and samples."""
        name = f"killed node ({NODES} nodes x {NPROC_PER_NODE} processes)"
        if subprocess.run([*OWN_SHM, "true"], capture_output=True).returncode:
            row = self.rows.setdefault(name, Row())
            row.failures.append("cannot give each node its own /dev/shm (needs root: unshare -m): not run")
            return
        # The uninterrupted reference runs beside the killed run (it is needed only for the
        # comparison at the end): the two never share a port, a folder or a /dev/shm.
        with ThreadPoolExecutor(max_workers=1) as beside:
            reference_run = beside.submit(self.multinode_reference)
            cases = [("object store", 1), ("shared folder", 0)]
            for store, kill_node in (case for case in cases if case[0] in stores):
                row = self.rows.setdefault(
                    f"{name}, checkpoints on {'an ' if store[0] == 'o' else 'a '}{store}", Row()
                )
                case = f"multinode-{store.replace(' ', '-')}"
                root = self.work / case
                batch, delay = self.rng.randrange(*seed_batches), self.rng.uniform(0.0, 0.3)
                with moto_s3() if store == "object store" else nullcontext({}) as env:
                    save_folder = (
                        f"s3://{BUCKET}/{case}/checkpoints" if env else str(root / "shared" / "checkpoints")
                    )
                    row.faults += 1
                    # Whatever the checkpoint's state: on an object store every rank uploads its shard in
                    # the background and Composer writes the `latest` link last, once all are up; a kill
                    # before that leaves an incomplete checkpoint that the restart must set aside.
                    trigger = after_batch(root / "node0", batch, delay)
                    outcomes, survivor_exit = self.run_nodes(root, save_folder, env, kill_node, trigger)
                    survivor = outcomes[1 - kill_node]
                    print(
                        f"[{case}] node {kill_node} SIGKILLed after batch {batch} (+{delay:.2f} s); node "
                        f"{1 - kill_node}'s launcher exited {survivor.returncode} {survivor_exit:.1f} s later; "
                        f"the checkpoints then: {checkpoint_state(save_folder, env)}"
                        if survivor_exit is not None
                        else f"[{case}] the kill did not happen",
                        flush=True,
                    )
                    if survivor.returncode is None:
                        row.hangs += 1
                        row.failures.append(f"{case}: node {1 - kill_node} hung after node {kill_node} died")
                        continue
                    if survivor_exit is None or survivor.returncode == 0:
                        row.failures.append(f"{case}: the kill did not happen (the run finished first)")
                        continue
                    outcomes, _ = self.run_nodes(root, save_folder, env)
                    if any(o.returncode is None for o in outcomes):
                        row.hangs += 1
                        row.failures.append(f"{case}: the restarted nodes hung")
                        continue
                    if any(o.returncode != 0 for o in outcomes):
                        row.failures.append(
                            f"{case}: the restart failed:\n" + "\n".join(o.output[-2000:] for o in outcomes)
                        )
                        continue
                    saved = {k: os.environ.get(k) for k in env}
                    os.environ.update(env)  # read_weights reaches the object store like the run did
                    try:
                        weights = read_weights(save_folder).state_dict
                    finally:
                        for key, value in saved.items():
                            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
                    reference = reference_run.result()
                lost, duplicated, _, same_order = compare_audits(reference[1], node_audits(root))
                row.lost, row.duplicated = row.lost + lost, row.duplicated + duplicated
                failures = len(row.failures)
                if not same_order:
                    row.failures.append(
                        f"{case}: the batches hold other samples than the uninterrupted run's"
                    )
                if weights.keys() != reference[0].keys() or not all(
                    torch.equal(weights[k], reference[0][k]) for k in weights
                ):
                    row.failures.append(f"{case}: final weights differ from the uninterrupted run's")
                if len(row.failures) == failures:
                    row.recovered += 1


# ----------------------------------------------------------------------------------------------
# Helpers


def after_batch(root: Path, batch: int, delay: float) -> Callable[[], bool]:
    """A trigger: true ``delay`` seconds after the run logged the start of ``batch``."""
    metrics = root / "run" / "metrics.jsonl"
    seen: list[float] = []
    size = [-1]

    def trigger() -> bool:
        if not seen:
            # Read again only once the file has grown: the suite polls every 10 ms.
            grown = metrics.exists() and metrics.stat().st_size != size[0]
            if grown:
                text = metrics.read_text(errors="replace")
                size[0] = len(text.encode())
                if f'"time/batch": {batch},' in text:
                    seen.append(time.monotonic())
            return False
        return time.monotonic() - seen[0] >= delay

    return trigger


def checkpoints_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("ep*-ba*") if not p.is_symlink()) if folder.is_dir() else []


def checkpoints(root: Path) -> list[Path]:
    folder = root / "run" / "checkpoints"
    return (
        checkpoints_in(folder)
        + checkpoints_in(folder / "pre-decay")
        + list((folder / "pre-decay").glob("pre-decay-*.pt"))
    )


def checkpoint_batch(path: Path) -> int:
    return int(path.name.split("ba")[1].split("-")[0].split(".")[0])


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state"]["model"].items()}


def audits(root: Path) -> dict[int, dict[int, list[int]]]:
    return {int(p.stem.split("rank")[1]): read_audit(p) for p in (root / "run").glob("samples-rank*.jsonl")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def checkpoint_state(save_folder: str, env: dict[str, str]) -> str:
    """What a save folder holds, in a few words: where ``latest`` points and each checkpoint's files."""
    if env:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=env["S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        prefix = save_folder.split(f"s3://{BUCKET}/", 1)[1].rstrip("/") + "/"
        keys = [
            item["Key"][len(prefix) :]
            for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        ]
    else:
        folder = Path(save_folder)
        keys = [str(p.relative_to(folder)) for p in folder.rglob("*")] if folder.is_dir() else []
    names = sorted(k.split("/")[0] for k in keys if "/" in k)
    parts = [f"{n} ({names.count(n)} files)" for n in dict.fromkeys(names)]
    links = [k for k in keys if k.startswith("latest")]
    return ", ".join(parts) + (f"; {links[0]}" if links else "; no latest link") if parts else "none"


def node_audits(root: Path) -> dict[int, dict[int, list[int]]]:
    """Every rank's sample audit, from each node's own run folder (``root/node*/run``)."""
    found: dict[int, dict[int, list[int]]] = {}
    for node in sorted(root.glob("node*")):
        found.update(audits(node))
    return found


def compare_audits(
    reference: dict[int, dict[int, list[int]]],
    got: dict[int, dict[int, list[int]]],
    rolled_back: Collection[int] = (),
) -> tuple[int, int, int, bool]:
    """(samples lost, samples duplicated, samples rolled back, same batches) of a recovered run
    against the reference.

    Over all ranks. The batches in ``rolled_back`` (0-based, as audited) were seen but their updates
    discarded by design (the loss-spike rollback): their samples count as rolled back, not trained.
    A reference sample neither trained nor rolled back is lost. "Same batches" means every batch of
    every rank holds the reference's samples in the reference's order (the data position resumed
    exactly).
    """
    lost = duplicated = discarded = 0
    same = set(got) == set(reference)
    for rank, batches in reference.items():
        mine = got.get(rank, {})
        want = [s for b in sorted(batches) for s in batches[b]]
        trained = [s for b in sorted(mine) if b not in rolled_back for s in mine[b]]
        skipped = {s for b in mine if b in rolled_back for s in mine[b]}
        seen = [*trained, *skipped]
        discarded += len(skipped - set(trained))
        lost += len(set(want) - set(trained) - skipped)
        duplicated += len(trained) - len(set(trained)) + len(set(seen) - set(want))
        same = same and mine == batches
    return lost, duplicated, discarded, same


def compare_shards(reference: Path, other: Path) -> tuple[int, int]:
    """(samples lost, extra samples) of a converted stream against a reference conversion, byte-wise."""
    lost = extra = 0
    for split in ("train", "val"):
        for name in sorted(p.name for p in (reference / split).iterdir()):
            a, b = reference / split / name, other / split / name
            if not b.exists() or a.read_bytes() != b.read_bytes():
                lost += 1
        extra += len(
            {p.name for p in (other / split).iterdir()} - {p.name for p in (reference / split).iterdir()}
        )
    return lost, extra


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_unpacked(mds: Path, sample: int) -> None:
    """Unpack the first shard as Streaming would, then flip a low bit inside ``sample``'s bytes.

    An MDS shard is ``num_samples`` (uint32), ``num_samples + 1`` absolute byte offsets (uint32),
    then the samples; the bit flipped is the middle byte of the sample's span.
    """
    import zstandard

    packed = mds / "train" / "shard.00000.mds.zstd"
    data = bytearray(zstandard.ZstdDecompressor().decompress(packed.read_bytes()))
    count = int(np.frombuffer(data, np.uint32, 1)[0])
    assert sample < count, f"sample {sample} is not in the first shard ({count} samples)"
    offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
    begin, end = int(offsets[sample]), int(offsets[sample + 1])
    data[(begin + end) // 2] ^= 0x01
    (mds / "train" / "shard.00000.mds").write_bytes(bytes(data))


def write_out_of_vocab(mds: Path) -> None:
    """Rewrite the training split with one sample holding id 4000 (vocabulary 300), checksum intact."""
    from data.convert import _SplitWriter
    from data.loader import read_shard_meta

    index = json.loads((mds / "train" / "index.json").read_text())
    meta = index["mamba_recipes"]
    info = read_shard_meta(mds / "train" / "index.json", "docs").tokenizer
    shutil.rmtree(mds / "train")
    writer = _SplitWriter(mds / "train", 32, "uint16", info.eot_id, info.pad_id, "64mb")
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 300, size=33 * 64).astype(np.uint16)
    tokens[33 * 5 + 7] = 4000
    tokens[-1] = info.eot_id
    writer.add(tokens, 1)
    writer.finish(meta)


# The groups of faults, in the order the suite runs them (``--only`` picks some).
# The kills at named points (``MAMBA_FAILPOINT``: ``event@n``, ``:rank=r`` for one rank only), in
# groups of a few runs each so that groups can run side by side: (table row, processes, points).
FAILPOINTS: dict[str, list[tuple[str, int, list[str]]]] = {
    "failpoints-checkpoint": [
        ("kill mid-checkpoint write", 1, ["checkpoint_write@1", "checkpoint_write@3", "checkpoint_write@6"])
    ],
    "failpoints-pre-decay": [("kill mid-pre-decay write", 1, ["checkpoint_write@5", "batch_checkpoint@9"])],
    "failpoints-eval": [("kill mid-evaluation", 1, ["eval_batch_end@1", "eval_batch_end@4"])],
    "failpoints-2proc": [("kill mid-checkpoint write", 2, ["checkpoint_write@2:rank=0"])],
    "failpoints-rank-1": [("one rank killed", 2, ["batch_end@5:rank=1"])],
    "failpoints-rank-0": [("one rank killed", 2, ["eval_batch_end@2:rank=0"])],
}

CASES: dict[str, Callable[[Suite], None]] = {
    "kill-1": lambda suite: suite.kills(1, 4),
    "kill-2": lambda suite: suite.kills(2, 1),
    "kill-2-again": lambda suite: suite.kills(2, 1, first=1),
    "failpoints-checkpoint": lambda suite: suite.failpoint_kills("failpoints-checkpoint"),
    "failpoints-pre-decay": lambda suite: suite.failpoint_kills("failpoints-pre-decay"),
    "failpoints-eval": lambda suite: suite.failpoint_kills("failpoints-eval"),
    "failpoints-2proc": lambda suite: suite.failpoint_kills("failpoints-2proc"),
    "failpoints-rank-1": lambda suite: suite.failpoint_kills("failpoints-rank-1"),
    "failpoints-rank-0": lambda suite: suite.failpoint_kills("failpoints-rank-0"),
    "conversion": Suite.conversion_kills,
    "corrupt-checkpoint": Suite.broken_checkpoints,
    "bad-data": Suite.bad_data,
    "bad-config": Suite.bad_config,
    "nan": Suite.nan,
    "nan-after-rollbacks": Suite.nan_after_rollbacks,
    "pre-decay-leftovers": Suite.pre_decay_leftovers,
    "deleted-local-shard": Suite.deleted_local_shard,
    "disk-full": Suite.disk_full,
    "multinode-object-store": lambda suite: suite.multinode(stores=("object store",)),
}
# Only with --multinode (or --only): the same kill with the checkpoints in a shared folder.
MULTINODE_CASES: dict[str, Callable[[Suite], None]] = {
    "multinode-shared-folder": lambda suite: suite.multinode(stores=("shared folder",)),
}


# Groups run at once by default. Measured on 2 cores (make test-faults, seed 0): with 2 groups at a
# time the cores were 45% busy (1253 s of wall for 1131 s of CPU); with 4, 69% (935 s for 1281 s).
JOBS = 2 * (os.cpu_count() or 1)

# Rough cost of each group (processes started), to start the longest first.
COST = {
    "multinode-object-store": 60,
    "multinode-shared-folder": 50,
    "failpoints-rank-1": 6,
    "failpoints-rank-0": 6,
    "failpoints-2proc": 6,
    "failpoints-checkpoint": 6,
    "failpoints-pre-decay": 4,
    "failpoints-eval": 4,
    "kill-1": 8,
    "kill-2": 6,
    "kill-2-again": 6,
    "corrupt-checkpoint": 6,
    "conversion": 5,
    "bad-config": 5,
    "nan": 3,
    "disk-full": 3,
    "bad-data": 3,
    "pre-decay-leftovers": 2,
    "nan-after-rollbacks": 1,
    "deleted-local-shard": 1,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fault_injection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points (default 0)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument(
        "--multinode",
        action="store_true",
        help="also kill a node of a 2-node x 2-process run (Suite.multinode; 4 processes, slow on 2 cores)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=[*CASES, *MULTINODE_CASES],
        metavar="CASE",
        help=f"run only this group of faults (repeatable): {', '.join([*CASES, *MULTINODE_CASES])}",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=JOBS,
        help=f"groups of faults run at once (default {JOBS}: twice the number of cores)",
    )
    args = parser.parse_args(argv)
    chosen = args.only or [*CASES, *(MULTINODE_CASES if args.multinode else ())]
    start = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(work, args.seed)
    try:
        suite.corpus()
        every = {**CASES, **MULTINODE_CASES}
        if not suite.own_shm and args.jobs > 1:
            print("cannot give each group its own /dev/shm (needs root: unshare -m): one group at a time")
            args.jobs = 1
        # The longest groups start first, so that the last to finish is a short one.
        order = sorted(chosen, key=lambda name: -COST.get(name, 0))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            running = {name: pool.submit(suite.run_case, name, every[name]) for name in order}
            rows: dict[str, Row] = {}
            for name in chosen:  # a kind of fault split over groups (kill-2, kill-2-again) is one line
                for label, row in running[name].result().items():
                    rows[label] = rows[label] + row if label in rows else row
    finally:
        shutil.rmtree(suite.shm_root, ignore_errors=True)
    print_table(rows, time.monotonic() - start, args.seed)
    print(f"CPU time of every process the suite started: {child_cpu_seconds():.0f} s", flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if all(row.ok() for row in rows.values()) else 1)


def print_table(rows: dict[str, Row], seconds: float, seed: int) -> None:
    head = [
        "fault",
        "injected",
        "recovered by the same command",
        "rejected with a clear error",
        "samples lost",
        "samples rolled back by design",
        "samples duplicated",
        "hangs",
    ]
    lines = [
        [name, r.faults, r.recovered, r.rejected, r.lost, r.rolled_back, r.duplicated, r.hangs]
        for name, r in rows.items()
    ]
    total = [sum(line[i] for line in lines) for i in range(1, len(head))]
    lines.append(["total", *total])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(f"\nfault injection (seed {seed}), {seconds / 60:.1f} min")
    print(fmt.format(*head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print(fmt.format(*line))
    for name, row in rows.items():
        for failure in row.failures:
            print(f"\nFAILED [{name}] {failure}")


if __name__ == "__main__":
    main()
