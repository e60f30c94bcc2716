"""Plan once, build from the plan (recipes/plan.py): what a plan holds, that building reads none of
it again, and that a plan which would train nothing, or other than the recipe says, is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks.jsonl_logger import read_jsonl
from common import cli
from common.config import ConfigError
from data.tokenizer import load_tokenizer
from recipes import train
from recipes.config import load_train_config
from recipes.plan import DECAY_IGNORE_KEYS, plan_run
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
WSD_RECIPE = ROOT / "yamls" / "tiny" / "wsd.yaml"
SHORT = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]


def test_the_plan_holds_the_geometry_tokenizer_streams_and_schedule(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_train_config([WSD_RECIPE], [*tiny_overrides(corpus, tmp_path), *SHORT])
    plan = plan_run(cfg, world=2)
    g = plan.geometry
    # 8 samples per step over 2 processes, micro-batches of 4: 4 per process, one micro-batch each.
    assert (g.world_size, g.global_batch, g.device_batch, g.micro_batch, g.accumulation) == (2, 8, 4, 4, 1)
    assert g.seq_len == 32 and g.tokens_per_batch == 8 * 32  # the corpus is converted with --seq-len 32
    assert plan_run(cfg, world=1).geometry.accumulation == 2
    assert plan.tokenizer.info.vocab_size == load_tokenizer(corpus["tokenizer"]).get_vocab_size() == 300
    assert set(plan.data.streams) == {"docs"} and plan.data.phase == "stable"
    assert plan.data.val is not None and plan.data.val.split == "val"
    assert (plan.schedule.name, plan.schedule.args["t_warmup"]) == ("wsd", "2ba")
    assert plan.load is None and plan.init_from is None and plan.parallelism is not None
    lines = plan.describe()
    assert any(line.startswith("geometry") and "256 tokens per batch" in line for line in lines), lines
    with pytest.raises(ConfigError, match="global_train_batch_size=8 is not divisible by the 3 processes"):
        plan_run(cfg, world=3)


def test_print_plan_shows_the_plan_and_writes_nothing(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [str(WSD_RECIPE), "--print-plan", *tiny_overrides(corpus, tmp_path), *SHORT]
    with pytest.raises(SystemExit) as exit_:
        cli.run(train.main, argv)
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "tokenizer " in out and "300 tokens" in out and "phase stable: docs (proportion 1.0)" in out, out
    assert not (tmp_path / "tiny-wsd").exists()


class _NoRead:
    """Stands in for ``tokenizers.Tokenizer``: any read of a tokenizer file fails the test."""

    @staticmethod
    def from_file(path: str) -> None:
        raise AssertionError(f"the build read {path} again")


def test_build_trainer_reads_nothing_the_plan_read(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning reads the tokenizer once and each split's index files; building reads none of them."""
    import data.loader
    import data.tokenizer
    import handover.hf_mamba

    cfg = load_train_config([WSD_RECIPE], [*tiny_overrides(corpus, tmp_path), *SHORT])
    reads: list[str] = []
    real = data.tokenizer.Tokenizer
    monkeypatch.setattr(
        data.tokenizer,
        "Tokenizer",
        type("Counting", (), {"from_file": staticmethod(lambda p: reads.append(p) or real.from_file(p))}),
    )
    plan = train.prepare_run(cfg)
    assert reads == [str(Path(corpus["tokenizer"]) / "tokenizer.json")]

    read_text = Path.read_text

    def guarded(path: Path, *args: object, **kwargs: object) -> str:
        assert path.name not in ("index.json", "tokenizer.json", "tokenizer_config.json"), path
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(data.tokenizer, "Tokenizer", _NoRead)
    monkeypatch.setattr(data.loader, "load_mixture", _NoRead.from_file)
    monkeypatch.setattr(handover.hf_mamba, "tokenizer_special_ids", _NoRead.from_file)
    monkeypatch.setattr(Path, "read_text", guarded)
    monkeypatch.setattr("recipes.plan.plan_run", lambda *a, **k: pytest.fail("build_trainer planned again"))
    trainer = train.build_trainer(plan)
    try:
        batch = next(iter(trainer.state.train_dataloader))
        assert batch["input_ids"].shape == (plan.geometry.device_batch, plan.geometry.seq_len)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------
# A decay from a checkpoint starts its own clock; a plan that would train nothing is refused


@pytest.fixture(scope="module")
def pre_decay(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint at batch 4 of a tiny WSD run (the stand-in for a pre-decay checkpoint at batch 180)."""
    root = tmp_path_factory.mktemp("pre")
    overrides = tiny_overrides(
        corpus, root, max_duration="4ba", eval_interval="null", **{"checkpoint.save_interval": "4ba"}
    )
    trainer = train.build_trainer(train.prepare_run(load_train_config([WSD_RECIPE], [*overrides, *SHORT])))
    trainer.fit()
    trainer.close()
    path = root / "tiny-wsd" / "checkpoints" / "ep0-ba4-rank0.pt"
    assert path.is_file()
    return path


def decay_recipe(tmp_path: Path) -> Path:
    """A custom decay as a new user writes one: no checkpoint.load_ignore_keys."""
    path = tmp_path / "my_decay.yaml"
    path.write_text(
        f"base: {WSD_RECIPE}\nrun_name: my-decay\nscheduler:\n  name: decay_phase\n  alpha_f: 0.1\n"
        "checkpoint:\n  pre_decay: false\n"
    )
    return path


def exit_of(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.run(train.main, argv)
    return int(exit_.value.code), capsys.readouterr().err


@pytest.mark.slow  # two tiny training runs
def test_a_decay_from_a_later_checkpoint_starts_its_own_clock(
    corpus: dict[str, Path], pre_decay: Path, tmp_path: Path
) -> None:
    """The reported case: max_duration 3ba from a checkpoint at batch 4 trained nothing and exited 0."""
    overrides = tiny_overrides(
        corpus, tmp_path, max_duration="3ba", eval_interval="null", **{"checkpoint.load_path": pre_decay}
    )
    cfg = load_train_config([decay_recipe(tmp_path)], overrides)
    plan = train.prepare_run(cfg)
    assert plan.load is not None and plan.load.clock is not None and plan.load.clock["batch"] == 4
    assert plan.load.ignore_keys == DECAY_IGNORE_KEYS and not plan.load.keeps_clock
    trainer = train.build_trainer(plan)
    # The checkpoint's weights are loaded (compared with the file, read independently).
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    saved = torch.load(pre_decay, map_location="cpu", weights_only=False)["state"]
    for name, value in trainer.state.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    # ... and AdamW's moments, where the decay's own clock starts at 0.
    ours = get_optimizer_state_dict(trainer.state.model, trainer.state.optimizers[0])["state"]
    theirs = next(iter(saved["optimizers"].values()))["state"]
    assert len(ours) == len(theirs) > 0
    assert all(torch.equal(ours[k]["exp_avg_sq"], theirs[k]["exp_avg_sq"]) for k in ours)
    assert int(trainer.state.timestamp.batch) == 0
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()
    lrs = [r["lr-AdamW/group0"] for r in read_jsonl(cfg.run_dir / "metrics.jsonl") if "lr-AdamW/group0" in r]
    # linear from the stable lr to alpha_f over the decay's own 3 batches: 1, 0.7, 0.4 of the peak
    assert lrs == pytest.approx([cfg.optimizer.lr * f for f in (1.0, 0.7, 0.4)], rel=1e-6)


def test_a_decay_keeping_the_checkpoints_clock_past_max_duration_exits_2(
    corpus: dict[str, Path], pre_decay: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = tiny_overrides(
        corpus, tmp_path, max_duration="3ba", eval_interval="null", **{"checkpoint.load_path": pre_decay}
    )
    code, err = exit_of([str(decay_recipe(tmp_path)), *overrides, "checkpoint.load_ignore_keys=[]"], capsys)
    assert code == 2, err
    assert "saved at batch 4 (4ba), at or past max_duration=3ba" in err, err
    assert "checkpoint.load_ignore_keys=[] keeps that clock: the run would train nothing" in err, err
    assert not (tmp_path / "my-decay").exists()


def test_a_decay_keeping_the_clock_past_its_start_exits_2(
    corpus: dict[str, Path], pre_decay: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = tiny_overrides(
        corpus, tmp_path, max_duration="10ba", eval_interval="null", **{"checkpoint.load_path": pre_decay}
    )
    code, err = exit_of([str(decay_recipe(tmp_path)), *overrides, "checkpoint.load_ignore_keys=[]"], capsys)
    assert code == 2, err
    assert "scheduler.t_start=0ba is before it: the decay would start part-way down" in err, err
    assert "Set scheduler.t_start=4ba" in err, err


def test_loading_a_checkpoint_past_max_duration_exits_2(
    corpus: dict[str, Path], pre_decay: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = tiny_overrides(
        corpus, tmp_path, max_duration="3ba", eval_interval="null", **{"checkpoint.load_path": pre_decay}
    )
    code, err = exit_of([str(WSD_RECIPE), *overrides, *SHORT], capsys)
    assert code == 2, err
    assert "the run would train nothing; set max_duration past 4ba" in err, err
    assert "add 'state/timestamp' to checkpoint.load_ignore_keys" in err, err
