"""The console a person reads, measured on real processes: a tiny training run, then its evaluation.

Each command runs as ``make demo`` runs it (its own Python, stdout and stderr on one stream, so every
warning Composer, Streaming or this repository prints is counted), and must stay within a line budget
while printing the lines that matter: the plan, where the checkpoints went, one line per evaluation.
A line redrawn in place (``\\r``) counts once, as a terminal shows it. ``--verbose`` brings back the
full output of both commands, which must be longer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.jsonl_logger import read_jsonl
from tests.conftest import tiny_overrides
from tests.test_console_progress import RECIPE, ROOT, WSD, console_lines

# Training: the threads line, the plan's six lines, where run.json went, the start, a progress line
# before each of the two evaluations and the two evaluation lines, the regular and the pre-decay
# checkpoints. Evaluation: its line and the sample's.
TRAIN_LINES = 15
EVALUATE_LINES = 2
PROMPT = "the "


def run(args: list[str], timeout: int = 600) -> list[str]:
    """The lines a terminal keeps of a command run from the repository root (exit status 0 asserted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    output = proc.stdout.decode()  # as bytes: text mode would turn each \r into a new line
    assert proc.returncode == 0, output[-6000:]
    return console_lines(output)


@pytest.mark.slow  # four Python processes that import torch and Composer: about a minute on 2 cores
def test_training_and_evaluation_fit_their_line_budget(corpus: dict[str, Path], tmp_path: Path) -> None:
    overrides = tiny_overrides(corpus, tmp_path, run_name="budget", **{"logging.progress_bar": True})
    lines = run(["recipes/train.py", str(RECIPE), *overrides, *WSD])
    run_dir = tmp_path / "budget"
    assert len(lines) <= TRAIN_LINES, "\n".join(lines)
    folder = run_dir / "checkpoints"
    essential = [
        f"[train] run       {run_dir} (checkpoints: {folder})",
        f"[train] resolved config, git revision and versions in {run_dir / 'run.json'}",
        "[train] budget: training to 8ba, from the start",
        f"[train] checkpoints in {folder}: " + ", ".join(f"ep0-ba{b}-rank0.pt" for b in (2, 4, 6, 8)),
        f"[train] pre-decay checkpoint in {folder / 'pre-decay'}: pre-decay-ba6.pt",
    ]
    for line in essential:
        assert line in lines, "\n".join(lines)
    evals = [line.split(":")[0] for line in lines if line.startswith("[eval]")]
    assert evals == ["[eval] batch 4", "[eval] batch 8"], lines
    assert any(line.startswith("[train] |####################| 8/8ba 100%") for line in lines), lines

    lines = run(["-m", "recipes.evaluate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "8"])
    assert len(lines) <= EVALUATE_LINES, "\n".join(lines)
    result = json.loads((run_dir / "evaluation.json").read_text())
    tokens = 8 * 8 * 32  # 8 batches of 8 samples of 32 tokens
    assert result["tokens_trained"] == tokens
    loss = result["metrics"]["all"]["cross_entropy"]
    assert lines[0].startswith(f"eval {run_dir} @{tokens:,} tokens: loss {loss:.4f}, ppl "), lines
    assert lines[0].endswith(f"val samples; by position: {run_dir / 'evaluation.json'})"), lines
    assert lines[1] == f"sample (temperature 0.8, top-k 40): {result['sample']!r}", lines
    # Every metric still reached the metrics file.
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert sum("loss/train/total" in r for r in logged) == 8
    assert sum("metrics/eval/LanguageCrossEntropy" in r for r in logged) == 2

    # --verbose: Composer's metric dump and the table by position come back.
    verbose = run(["recipes/train.py", str(RECIPE), *overrides, *WSD, "run_name=loud", "--verbose"])
    assert len(verbose) > 3 * TRAIN_LINES and "[train] git " in "\n".join(verbose), verbose
    verbose = run(["-m", "recipes.evaluate", str(tmp_path / "loud"), "--verbose", "--prompt", PROMPT])
    assert len(verbose) > 3 * EVALUATE_LINES and any(line.startswith("positions") for line in verbose)
