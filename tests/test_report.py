"""eval/report.py: valid PNGs whose plotted series are the logged values, paired by step, on hand-written
metrics files (every case of pairing) and on the metrics.jsonl of a real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from composer.core import Callback, State
from composer.loggers import Logger

from eval import report
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]

STEPS = 40
TOKENS_PER_STEP = 100


def lr_at(step: int, wsd: bool) -> float:
    """A WSD (stable to step 30, then linear) or a cosine schedule, peak 1e-3."""
    if wsd:
        return 1e-3 if step < 30 else 1e-3 * (1 - 0.9 * (step - 29) / 10)
    return 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))


def write_run(path: Path, loss_shift: float, wsd: bool, weighted: bool) -> dict[int, float]:
    """A metrics.jsonl as Composer's JSON-lines logger writes it: one line per logged group, a
    hyperparameter record, an epoch boundary at step 20 that logs the training CE a second time
    (another value), and evaluations at steps 20 and 40. Returns {step: training CE}."""
    path.mkdir(parents=True)
    ce = {s: 5.0 - 2.0 * s / STEPS + loss_shift + 0.05 * math.sin(s) for s in range(STEPS)}
    lines: list[dict] = [{"hyperparameters": {"config": {"run_name": path.name}}}]
    for s in range(STEPS):
        lines += [
            {"step": s, LR: lr_at(s, wsd)},
            {"step": s, "time/token": s * TOKENS_PER_STEP},
            {"step": s, "loss/train/total": ce[s] * (0.9 if weighted else 1.0)},
            {"step": s, "metrics/train/LanguageCrossEntropy": ce[s]},
        ]
        if s == 20:  # the epoch boundary: the same key logged again at the same step
            lines.append({"step": s, "metrics/train/LanguageCrossEntropy": ce[s] + 1.0})
        if s in (20, 39):
            lines.append({"step": s, "metrics/eval/LanguagePerplexity": math.exp(ce[s]),
                          "metrics/eval/Top3Accuracy": 0.1 + s / 400, "metrics/eval/Top10Accuracy": 0.2 + s / 400})  # fmt: skip
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ce


LR = "lr-AdamW/group0"


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, dict[int, float]]:
    logged = {
        "wsd": write_run(tmp_path / "wsd", 0.0, wsd=True, weighted=False),
        "cosine": write_run(tmp_path / "cosine", 0.001, wsd=False, weighted=False),  # nearly coincides
        "wsd-posweight": write_run(tmp_path / "wsd-posweight", 0.05, wsd=True, weighted=True),
    }
    evaluation = {"buckets": ["0-15", "16+"], "samples": 10,
                  "metrics": {"all": {"cross_entropy": 3.0, "perplexity": math.exp(3.0), "top1": 0.2, "top3": 0.3, "top10": 0.4},
                              "0-15": {"top3": 0.25, "top10": 0.35}, "16+": {"top3": 0.32, "top10": 0.42}}}  # fmt: skip
    (tmp_path / "wsd" / "evaluation.json").write_text(json.dumps(evaluation))
    return logged


def test_plotted_series_equal_the_logged_values(runs: dict[str, dict[int, float]], tmp_path: Path) -> None:
    loaded = report.load_runs([tmp_path / name for name in runs])
    figures = report.build_figures(loaded)
    ax = figures["train_loss.png"].axes[0]
    lines = ax.get_lines()
    # One faint raw line and one bold smoothed line per run, in order; one legend entry per run.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(runs)
    for i, (name, ce) in enumerate(runs.items()):
        raw, smooth = lines[2 * i], lines[2 * i + 1]
        assert list(raw.get_xdata()) == [s * TOKENS_PER_STEP for s in range(STEPS)]
        # Paired by step: the unweighted CE (even for the weighted run), the first value at step 20.
        assert list(raw.get_ydata()) == [ce[s] for s in range(STEPS)], name
        assert (
            smooth.get_label() == name
            and raw.get_alpha() == 0.25
            and smooth.get_linewidth() > raw.get_linewidth()
        )
        # Centred mean over 5% of 40 points = 2 -> half-window 1: the last point averages 38 and 39.
        assert smooth.get_ydata()[-1] == pytest.approx((ce[38] + ce[39]) / 2)
        assert smooth.get_ydata()[10] == pytest.approx((ce[9] + ce[10] + ce[11]) / 3)
    # Distinct colour and line style for every run.
    styles = {(str(lines[2 * i + 1].get_color()), lines[2 * i + 1].get_linestyle()) for i in range(len(runs))}
    assert len(styles) == len(runs) and len({s[1] for s in styles}) == len(runs)
    # The y-range covers the last 70% of training, not the high start.
    tail = [
        v for ce in runs.values() for s, v in ce.items() if s * TOKENS_PER_STEP >= 0.3 * 39 * TOKENS_PER_STEP
    ]
    low, high = ax.get_ylim()
    assert low < min(tail) and high > max(tail) and high < max(ce[0] for ce in runs.values())
    # The decay figure starts where WSD leaves its peak (step 29).
    assert figures["decay.png"].axes[0].get_xlim()[0] == pytest.approx(29 * TOKENS_PER_STEP)
    ppl = figures["val_perplexity.png"].axes[0].get_lines()
    assert [list(line.get_ydata()) for line in ppl] == [
        [math.exp(ce[20]), math.exp(ce[39])] for ce in runs.values()
    ]
    bars = [p for p in figures["topk.png"].axes[2].patches]
    assert [b.get_height() for b in bars] == [0.25, 0.32]  # only the evaluated run has bucket bars
    lr = figures["lr.png"].axes[0].get_lines()
    assert list(lr[1].get_ydata()) == [lr_at(s, wsd=False) for s in range(STEPS)]


def test_report_writes_valid_pngs_and_a_summary(
    runs: dict[str, dict[int, float]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    report.main([*(str(tmp_path / name) for name in runs), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    pngs = sorted(out.glob("*.png"))
    assert sorted(p.name for p in pngs) == [
        "decay.png",
        "lr.png",
        "topk.png",
        "train_loss.png",
        "val_perplexity.png",
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| wsd | 3900 |" in summary and "| cosine | 3900 |" in summary
    assert "0.2500 / 0.3500" in summary  # the bucket table of the evaluated run
    assert f"{math.exp(runs['cosine'][39]):.2f}" in summary  # the last logged perplexity otherwise
    # The console: the final numbers per run (the summary's first table), then what was written.
    table = summary.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(runs) and printed[:-1] == table, printed
    assert printed[-1].startswith(f"wrote {out}: ") and "summary.md" in printed[-1], printed


def test_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl not found"):
        report.load_runs([tmp_path / "nope"])


class TrainCE(Callback):
    """What the run computed: batch index -> its training cross-entropy (Composer's own metric)."""

    def __init__(self) -> None:
        self.ce: dict[int, float] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.ce[int(state.timestamp.batch) - 1] = float(state.train_metrics["LanguageCrossEntropy"].compute())


def test_a_real_run_plots_what_it_trained_on(corpus: dict[str, Path], tmp_path: Path) -> None:
    """The metrics.jsonl a real tiny run wrote (8 batches of 8 x 32 tokens): the plotted training
    loss is each batch's cross-entropy, as the run computed it, at the tokens trained before it."""
    cfg = load_train_config(
        [ROOT / "yamls" / "tiny" / "wsd.yaml"],
        [*tiny_overrides(corpus, tmp_path / "runs"), "scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"],
    )
    recorder = TrainCE()
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=[recorder])
    trainer.fit()
    trainer.close()
    assert sorted(recorder.ce) == list(range(8))
    (run,) = report.load_runs([cfg.run_dir])
    raw = report.build_figures([run])["train_loss.png"].axes[0].get_lines()[0]
    assert list(raw.get_xdata()) == [256.0 * batch for batch in range(8)]
    assert list(raw.get_ydata()) == pytest.approx([recorder.ce[b] for b in range(8)], rel=1e-6)
    written = report.write_report([cfg.run_dir], tmp_path / "out")
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written if p.suffix == ".png")


def write_seeded(root: Path, variant: str, seed: int, ce: float, top3_late: float) -> Path:
    """A run folder <variant>-s<seed> with a metrics.jsonl and an evaluation.json of known values."""
    path = root / f"{variant}-s{seed}"
    write_run(path, 0.0, wsd=variant != "cosine", weighted=variant == "wsd-posweight")
    row = {
        "tokens": 10,
        "cross_entropy": ce,
        "perplexity": math.exp(ce),
        "top1": 0.2,
        "top3": 0.3,
        "top10": 0.4,
    }
    late = {**row, "top3": top3_late}
    evaluation = {"buckets": ["0-15", "16+"], "samples": 10, "tokens_trained": 3900,
                  "metrics": {"all": row, "0-15": row, "16+": late}}  # fmt: skip
    (path / "evaluation.json").write_text(json.dumps(evaluation))
    return path


def test_findings_state_each_comparison_with_its_interval_and_verdict(tmp_path: Path) -> None:
    paths = []
    # wsd - cosine CE: -0.30, -0.25, -0.20 (mean -0.25, s 0.05); weighting top-3 at 16+: +0.01, +0.02, +0.03.
    for seed in range(3):
        paths.append(write_seeded(tmp_path, "wsd", seed, 3.0, 0.30))
        paths.append(write_seeded(tmp_path, "cosine", seed, 3.30 - 0.05 * seed, 0.30))
        paths.append(write_seeded(tmp_path, "wsd-posweight", seed, 3.0, 0.31 + 0.01 * seed))
    report.write_report(paths, tmp_path / "out")
    findings = (tmp_path / "out" / "findings.md").read_text()
    assert "Runs: wsd (seeds 0, 1, 2); cosine (seeds 0, 1, 2); wsd-posweight (seeds 0, 1, 2)." in findings
    # By hand: t(0.975; 2) = 4.3027 (table); half-width 4.3027 * 0.05 / sqrt(3) = 0.1242.
    assert (
        "| WSD vs cosine: wsd - cosine | val CE (nats) | all | -0.2500 | [-0.3742, -0.1258] | -0.0188 | effect |"
        in findings
    )
    # Half-width 4.3027 * 0.01 / sqrt(3) = 0.0248 around +0.02: holds 0 and +0.01.
    assert (
        "| weighting vs none: wsd-posweight - wsd | top-3 | 16+ | +0.0200 | [-0.0048, +0.0448] | +0.0100 (ours) | "
        "inconclusive (interval too wide) |" in findings
    )
    # Every paired comparison is stated; none as a bare mean.
    rows = [
        line
        for line in findings.splitlines()
        if line.startswith("| WSD vs") or line.startswith("| weighting")
    ]
    assert len(rows) == 3 + 1 + 2 * 3 and all("[" in row for row in rows)
    for name in ("train_loss.png", "decay.png", "topk.png"):
        assert f"]({name})" in findings and (tmp_path / "out" / name).is_file()
    # The figures show the first seed of each variant.
    figure = report.build_figures([r for r in report.load_runs(paths) if r.path.name.endswith("-s0")])
    assert [t.get_text() for t in figure["train_loss.png"].axes[0].get_legend().get_texts()] == [
        "wsd-s0", "cosine-s0", "wsd-posweight-s0",
    ]  # fmt: skip

    # The README block naming this page receives its tables, and only them.
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- findings: out/findings.md -->\nold table\n<!-- /findings -->\nafter\n")
    report.main(["--sync-readme", str(readme)])
    text = readme.read_text()
    block = text.split("<!-- findings: out/findings.md -->\n")[1].split("<!-- /findings -->")[0]
    assert block == report.findings_tables(findings) and "old table" not in text
    assert text.startswith("intro\n") and text.endswith("<!-- /findings -->\nafter\n")
    assert "[-0.3742, -0.1258]" in block and "# Findings" not in block


def test_sync_readme_leaves_blocks_of_missing_pages_and_refuses_when_none_exists(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- findings: runs/x/findings.md -->\nkept\n<!-- /findings -->\n")
    with pytest.raises(
        report.cli.UserError, match=r"none of the findings pages .* exists \(runs/x/findings\.md\)"
    ):
        report.sync_readme(readme)
    page = tmp_path / "runs" / "y" / "findings.md"
    page.parent.mkdir(parents=True)
    page.write_text("# Findings\n\n<!-- tables -->\n| a |\n<!-- /tables -->\n")
    readme.write_text(readme.read_text() + "<!-- findings: runs/y/findings.md -->\nold\n<!-- /findings -->\n")
    assert report.sync_readme(readme) == ([page], ["runs/x/findings.md"])
    assert readme.read_text() == (
        "<!-- findings: runs/x/findings.md -->\nkept\n<!-- /findings -->\n"
        "<!-- findings: runs/y/findings.md -->\n| a |\n<!-- /findings -->\n"
    )


def test_runs_evaluated_after_different_token_counts_are_not_compared(tmp_path: Path) -> None:
    """A stable run and the decay started from its checkpoint (as `make demo` makes them) are
    evaluated after different token counts: the findings say so and compare nothing."""
    stable = write_seeded(tmp_path, "wsd", 0, 3.0, 0.30)
    decay = write_seeded(tmp_path, "cosine", 0, 2.5, 0.30)
    evaluation = json.loads((decay / "evaluation.json").read_text())
    (decay / "evaluation.json").write_text(json.dumps({**evaluation, "tokens_trained": 1300}))
    report.write_report([stable, decay], tmp_path / "out")
    findings = (tmp_path / "out" / "findings.md").read_text()
    assert (
        "Not compared: the runs were evaluated after different token counts (wsd (seed 0) 3,900, " in findings
    )
    assert "cosine (seed 0) 1,300)" in findings
    assert "| WSD vs cosine" not in findings


def test_a_decay_from_a_checkpoint_is_drawn_from_where_the_checkpoint_stood(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    """A stable run saves at batch 4 (4 x 8 x 32 = 1,024 tokens); a decay started from that checkpoint
    with checkpoint.load_path starts its own clock, and the report draws it from 1,024 tokens on, as
    planning recorded in its run.json: the checkpoint may be gone by the time the report is made, and
    a resume of the decay keeps the record."""
    wsd = ROOT / "yamls" / "tiny" / "wsd.yaml"
    short = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25", "eval_interval=null"]
    stable_cfg = load_train_config(
        [wsd], [*tiny_overrides(corpus, tmp_path, max_duration="4ba", run_name="stable"), *short]
    )
    trainer = build_trainer(prepare_run(stable_cfg))
    trainer.fit()
    trainer.close()
    checkpoint = stable_cfg.run_dir / "checkpoints" / "ep0-ba4-rank0.pt"
    decay_yaml = tmp_path / "decay.yaml"
    decay_yaml.write_text(f"base: {wsd}\nrun_name: decay\nscheduler:\n  name: decay_phase\n  alpha_f: 0.1\n")
    decay_cfg = load_train_config(
        [decay_yaml],
        tiny_overrides(
            corpus,
            tmp_path,
            max_duration="3ba",
            eval_interval="null",
            **{"checkpoint.load_path": checkpoint, "checkpoint.pre_decay": False},
        ),
    )
    trainer = build_trainer(prepare_run(decay_cfg))
    trainer.fit()
    trainer.close()
    recorded = json.loads((decay_cfg.run_dir / "run.json").read_text())["load_path_source"]
    assert recorded == {"path": str(checkpoint), "tokens_seen": 4 * 8 * 32, "clock_kept": False}
    # A resume of the finished decay loads its own checkpoint and keeps where the run began.
    plan = prepare_run(decay_cfg)
    assert plan.load is not None and plan.load.own and plan.load.source == recorded
    build_trainer(plan).close()
    assert json.loads((decay_cfg.run_dir / "run.json").read_text())["load_path_source"] == recorded

    checkpoint.rename(tmp_path / "moved.pt")  # the report needs the record, not the checkpoint
    stable, decay = report.load_runs([stable_cfg.run_dir, decay_cfg.run_dir])
    # Each batch's loss at the tokens trained before it: the stable run's own, the decay's after 1,024.
    assert stable.train_ce().tokens == [256.0 * b for b in range(4)]
    assert decay.train_ce().tokens == [1024.0 + 256.0 * b for b in range(3)]
    lines = report.build_figures([stable, decay])["train_loss.png"].axes[0].get_lines()
    # two lines a run (raw, smoothed), at those tokens
    assert [list(line.get_xdata()) for line in lines] == [stable.train_ce().tokens] * 2 + [
        decay.train_ce().tokens
    ] * 2
