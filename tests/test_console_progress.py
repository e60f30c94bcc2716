"""The training console (callbacks/console_progress.py): a real short run's captured output.

The quiet console prints a few lines (the plan, one progress line redrawn in place, one line per
evaluation, where the checkpoints went); every metric still reaches metrics.jsonl, and the printed
numbers are checked against it. ``--verbose`` brings back Composer's per-batch metric dump.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.jsonl_logger import read_jsonl
from recipes.config import load_train_config
from recipes.train import build_trainer, parse_args, prepare_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "yamls" / "tiny" / "wsd.yaml"
WSD = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]  # 8 batches: the stable phase ends after 6


def console_lines(output: str) -> list[str]:
    """The lines a terminal keeps: a line redrawn with ``\\r`` counts once, as its last drawing."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in output.rstrip("\n").split("\n")]


def run(overrides: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[str, str, Path]:
    """(stdout, stderr, run folder) of a training run in this process."""
    cfg = load_train_config([RECIPE], overrides)
    trainer = build_trainer(prepare_run(cfg))
    trainer.fit()
    trainer.close()
    captured = capfd.readouterr()
    return captured.out, captured.err, cfg.run_dir


def test_quiet_console_is_short_and_says_what_happened(
    corpus: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    overrides = tiny_overrides(corpus, tmp_path, run_name="quiet", **{"logging.progress_bar": True})
    out, err, run_dir = run([*overrides, *WSD], capfd)
    lines = console_lines(out)
    assert "loss/train/total" not in err
    # the plan's six lines, where run.json went, the start, two progress lines, two evaluations, the
    # two checkpoint folders: 14 for an 8-batch run with 2 evaluations (the revision: --verbose)
    assert len(lines) <= 14, "\n".join(lines)
    assert not any(line.startswith("[train] git ") for line in lines), out
    assert f"[train] resolved config, git revision and versions in {run_dir / 'run.json'}" in lines
    assert not any("[batch=" in line or "loss/train/total" in line for line in lines), out

    assert "[train] quiet: training to 8ba, from the start" in lines
    records = read_jsonl(run_dir / "metrics.jsonl")
    last_loss = [r["loss/train/total"] for r in records if "loss/train/total" in r][-1]
    progress = [line for line in lines if line.startswith("[train] |")]
    assert progress and progress[-1].startswith("[train] |####################| 8/8ba 100%"), progress
    assert f"loss {last_loss:.4f}" in progress[-1] and "tok/s" in progress[-1] and "ETA 0:00" in progress[-1]

    evals = [line for line in lines if line.startswith("[eval]")]
    logged = [r for r in records if "metrics/eval/LanguageCrossEntropy" in r]
    assert [line.split(":")[0] for line in evals] == ["[eval] batch 4", "[eval] batch 8"]
    for line, record in zip(evals, logged, strict=True):
        assert f"LanguageCrossEntropy {record['metrics/eval/LanguageCrossEntropy']:.4g}" in line
        assert f"Top3Accuracy {record['metrics/eval/Top3Accuracy']:.4g}" in line

    folder = run_dir / "checkpoints"
    on_disk = sorted(p.name for p in folder.glob("ep*-ba*-rank0.pt"))
    assert on_disk == ["ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt", "ep0-ba8-rank0.pt"]
    assert f"[train] checkpoints in {folder}: {', '.join(on_disk)}" in lines
    assert (folder / "pre-decay" / "pre-decay-ba6.pt").is_file()
    assert f"[train] pre-decay checkpoint in {folder / 'pre-decay'}: pre-decay-ba6.pt" in lines


def test_progress_lines_without_a_bar_every_interval(
    corpus: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="lines",
        eval_interval="null",
        max_duration="4ba",
        **{"logging.console_interval": "2ba"},
    )
    out, _, _ = run([*overrides, *WSD], capfd)
    assert "\r" not in out
    progress = [line for line in console_lines(out) if line.startswith("[train] |")]
    assert [line.split()[2] for line in progress] == ["2/4ba", "4/4ba"]


def test_verbose_restores_composers_metric_dump(
    corpus: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _, overrides, _ = parse_args([str(RECIPE), "max_duration=4ba", "--verbose"])
    assert "logging.verbose=true" in overrides
    capfd.readouterr()
    extra = tiny_overrides(
        corpus,
        tmp_path,
        run_name="verbose",
        eval_interval="null",
        max_duration="4ba",
        **{"logging.console_interval": "1ba"},
    )
    out, err, run_dir = run([*extra, *WSD, "logging.verbose=true"], capfd)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss/train/total" in r]
    # Composer's ConsoleLogger (on stderr): every batch, as the metrics file has it.
    assert (out + err).count("Train loss/train/total") == len(steps) == 4
    assert "[train] git " in out
    assert "[train] |" not in out + err


@pytest.mark.dist
def test_only_rank_zero_prints(corpus: dict[str, Path], tmp_path: Path) -> None:
    """Two processes train; the console shows each line once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="two",
        max_duration="4ba",
        eval_interval="4ba",
        **{"fsdp.state_dict_type": "full"},
    )
    launcher = str(Path(sys.executable).parent / "composer")
    cmd = [launcher, "-n", "2", "--master_port", str(port), str(ROOT / "recipes" / "train.py"), str(RECIPE)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*cmd, *overrides, *WSD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    output = proc.stdout + proc.stderr
    assert output.count("[train] two: training to 4ba") == 1, output
    assert output.count("[eval] batch 4:") == 1, output
