"""eval/ablation.py: mean ± std across seeds and the paper's directions, checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import ablation

BUCKETS = ["0-15", "16-63", "64+"]


def write_eval(root: Path, variant: str, seed: int, ce: float, top3: list[float], tokens: int = 1000) -> None:
    metrics = {
        "all": {
            "tokens": 10,
            "cross_entropy": ce,
            "perplexity": 2.0**ce,
            "top1": 0.1,
            "top3": 0.3,
            "top10": 0.5,
        }
    }
    for bucket, value in zip(BUCKETS, top3):
        metrics[bucket] = {"tokens": 5, "top3": value, "top10": value + 0.1}
    folder = root / f"{variant}-s{seed}"
    folder.mkdir(parents=True)
    record = {"buckets": BUCKETS, "metrics": metrics, "tokens_trained": tokens}
    (folder / "evaluation.json").write_text(json.dumps(record))


def test_table_and_comparisons_with_intervals(tmp_path: Path) -> None:
    # WSD below cosine in 2 of 3 seeds; weighting: lower early, higher later.
    for seed, (wsd, cos) in enumerate([(3.0, 3.2), (3.1, 3.0), (2.9, 3.1)]):
        write_eval(tmp_path, "wsd", seed, wsd, [0.30, 0.40, 0.50])
        write_eval(tmp_path, "cosine", seed, cos, [0.30, 0.40, 0.50])
        write_eval(
            tmp_path, "wsd-posweight", seed, wsd + 0.01, [0.28, 0.41 + 0.01 * seed, 0.49 - 0.001 * seed]
        )
    ablation.main([str(tmp_path), "--seeds", "0", "1", "2"])
    text = (tmp_path / "ablation.md").read_text()
    # mean ± sample std of (3.0, 3.1, 2.9) = 3.0 ± 0.1
    assert "| wsd | 3.0000 ± 0.1000 |" in text
    # By hand, t(0.975; 2 df) = 4.3027 (Student t table, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
    # wsd - cosine = -0.2, +0.1, -0.2: mean -0.1, s = 0.1732, s / sqrt(3) = 0.1, half-width 0.4303:
    # [-0.5303, +0.3303] holds 0 and the paper's ln(11.58 / 11.80) = -0.0188: inconclusive.
    assert (
        "| WSD vs cosine: wsd - cosine | val CE (nats) | all | -0.1000 | [-0.5303, +0.3303] | -0.0188 | "
        "inconclusive (interval too wide) |" in text
    )
    # weighting CE: +0.01 every seed, s = 0: the interval is the point +0.01, which excludes 0.
    assert (
        "| weighting vs none: wsd-posweight - wsd | val CE (nats) | all | +0.0100 | [+0.0100, +0.0100] |"
        in text
    )
    # top-3 at 16-63: +0.01, +0.02, +0.03: mean 0.02, s 0.01, half 4.3027 * 0.01 / sqrt(3) = 0.0248.
    assert (
        "| weighting vs none: wsd-posweight - wsd | top-3 | 16-63 | +0.0200 | [-0.0048, +0.0448] | +0.0100 (ours) | "
        "inconclusive (interval too wide) |" in text
    )
    # top-3 at 0-15: -0.02 every seed: an effect (a loss at the first positions, as the paper expects).
    assert "| top-3 | 0-15 | -0.0200 | [-0.0200, -0.0200] | +0.0100 (ours) | effect |" in text
    # top-3 at 64+: -0.01, -0.011, -0.012: mean -0.011, s 0.001, half 0.0025: [-0.0135, -0.0085].
    assert "| top-3 | 64+ | -0.0110 | [-0.0135, -0.0085] |" in text
    assert "Student t with n - 1 = 2 degrees of freedom (t = 4.303)" in text
    assert "ln(11.58 / 11.80) = -0.0188 nats" in text


def test_an_interval_that_excludes_the_papers_size_is_no_effect(tmp_path: Path) -> None:
    # 5 seeds, wsd - cosine = +0.001, -0.001, +0.0005, 0, -0.0005: mean 0, s = sqrt(2.5e-6 / 4) = 7.906e-4;
    # half-width t(0.975; 4) = 2.7764 (table) * 7.906e-4 / sqrt(5) = 9.817e-4: [-0.0010, +0.0010]
    # holds 0 and excludes -0.0188.
    for seed, diff in enumerate([0.001, -0.001, 0.0005, 0.0, -0.0005]):
        write_eval(tmp_path, "wsd", seed, 3.0 + diff, [0.3, 0.4, 0.5])
        write_eval(tmp_path, "cosine", seed, 3.0, [0.3, 0.4, 0.5])
    evals = ablation.load_evaluations(tmp_path, ["wsd", "cosine"], range(5))
    overall = ablation.measure_all(evals)[0]
    assert overall.interval is not None
    assert overall.interval.mean == pytest.approx(0.0, abs=1e-12)
    assert overall.interval.high == pytest.approx(2.7764451 * (2.5e-6 / 4) ** 0.5 / 5**0.5, rel=1e-6)
    assert overall.verdict == "no effect at this scale (interval excludes the paper's size)"
    # The per-bucket rows: top-3 is not compared for WSD vs cosine, only cross-entropy (absent here).
    assert [m.comparison.bucket for m in ablation.measure_all(evals)] == ["all"]


def test_the_hybrid_is_compared_with_each_pure_model(tmp_path: Path) -> None:
    # hybrid - mamba2 = -0.1 every seed: s = 0, the interval is the point -0.1, which excludes 0: effect.
    # hybrid - attention = 0, +0.1, -0.1: mean 0, s = 0.1, half-width 4.3027 * 0.1 / sqrt(3) = 0.2484:
    # [-0.2484, +0.2484] holds 0 and our -0.01: inconclusive.
    for seed, ce in enumerate([3.0, 3.1, 2.9]):
        write_eval(tmp_path, "hybrid", seed, ce, [0.3, 0.4, 0.5])
        write_eval(tmp_path, "mamba2", seed, ce + 0.1, [0.3, 0.4, 0.5])
        write_eval(tmp_path, "attention", seed, 3.0, [0.3, 0.4, 0.5])
    ablation.main([str(tmp_path), "--variants", "mamba2", "hybrid", "attention", "--seeds", "0", "1", "2"])
    text = (tmp_path / "ablation.md").read_text()
    assert (
        "| hybrid vs Mamba-2: hybrid - mamba2 | val CE (nats) | all | -0.1000 | [-0.1000, -0.1000] | "
        "-0.0100 (ours) | effect |" in text
    )
    assert (
        "| hybrid vs attention: hybrid - attention | val CE (nats) | all | +0.0000 | [-0.2484, +0.2484] | "
        "-0.0100 (ours) | inconclusive (interval too wide) |" in text
    )
    # Only the hybrid's two comparisons: the schedule and weighting claims need variants not run here.
    claims = {m.comparison.claim for m in ablation.measure_all(
        ablation.load_evaluations(tmp_path, ["mamba2", "hybrid", "attention"], range(3))
    )}  # fmt: skip
    assert claims == {"hybrid vs Mamba-2", "hybrid vs attention"}


def test_unequal_tokens_and_missing_runs_are_refused(tmp_path: Path) -> None:
    write_eval(tmp_path, "wsd", 0, 3.0, [0.3, 0.4, 0.5], tokens=1000)
    write_eval(tmp_path, "cosine", 0, 3.0, [0.3, 0.4, 0.5], tokens=900)
    with pytest.raises(ValueError, match="different token counts"):
        ablation.load_evaluations(tmp_path, ["wsd", "cosine"], [0])
    with pytest.raises(FileNotFoundError, match="wsd-s1"):
        ablation.load_evaluations(tmp_path, ["wsd"], [0, 1])
