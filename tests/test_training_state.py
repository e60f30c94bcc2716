"""A release with its training state continues exactly: export --with-training-state, then init_from.

The reference for every number is the Composer checkpoint itself (``torch.load``) and the same
decay started from it with ``checkpoint.load_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from callbacks.jsonl_logger import read_jsonl
from eval.report import start_tokens
from handover.tensor_files import PendingTensor, write_safetensors
from recipes.config import load_train_config
from recipes.export import main as export_main
from recipes.train import build_trainer, prepare_run
from tests.conftest import tiny_overrides
from tests.s3_server import s3_bucket  # noqa: F401  (a fixture)
from tests.test_train import ROOT

STABLE = {"scheduler.t_warmup": "2ba", "scheduler.t_decay": 0.25, "eval_interval": "null"}


def fit(overrides: list[str], recipe: str, extra: list[Callback] | None = None) -> Path:
    cfg = load_train_config([ROOT / recipe], overrides)
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=extra)
    trainer.fit()
    trainer.close()
    return cfg.run_dir


def export_cli(*args: str) -> None:
    from common import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_main, list(args))
    assert exit_info.value.code == 0


class RecordBatches(Callback):
    """The input ids of every batch a run trains on."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def batch_start(self, state: State, logger: Logger) -> None:
        self.batches.append(state.batch["input_ids"].clone())


@pytest.fixture(scope="module")
def stable_run(
    corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RecordBatches]:
    """A 12-batch WSD run (stable until batch 9, its pre-decay checkpoint), checkpoints every 3 batches."""
    root = tmp_path_factory.mktemp("release")
    seen = RecordBatches()
    overrides = tiny_overrides(
        corpus, root, run_name="stable", max_duration="12ba", **{**STABLE, "checkpoint.save_interval": "3ba"}
    )
    return fit(overrides, "yamls/tiny/wsd.yaml", [seen]), seen


def test_streaming_safetensors_writer_is_read_by_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.int64), "s": torch.tensor(4.0)}
    pending = [PendingTensor(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", pending, {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value), key


def test_export_writes_moments_position_and_card(
    stable_run: tuple[Path, RecordBatches], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run, _ = stable_run
    pre_decay = run / "checkpoints" / "pre-decay" / "pre-decay-ba9.pt"
    out = tmp_path / "release"
    export_cli(str(pre_decay), "--to", "hf", "--out", str(out), "--with-training-state")
    ckpt = torch.load(pre_decay, map_location="cpu", weights_only=False)["state"]
    optim = ckpt["optimizers"]["AdamW"]
    with safe_open(str(out / "optimizer.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert len(keys) == 3 * len(optim["state"])
        for fqn, entry in optim["state"].items():
            name = fqn.removeprefix("model.").replace("backbone.embedding.", "backbone.embeddings.")
            for kind in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(f.get_tensor(f"{kind}.{name}"), entry[kind].float()), f"{kind}.{name}"
    info = json.loads((out / "training_state.json").read_text())
    assert info["checkpoint"] == "pre-decay"
    assert info["batches_seen"] == 9 and info["tokens_seen"] == int(ckpt["timestamp"]["Timestamp"]["token"])
    assert info["lr"] == optim["param_groups"][0]["lr"] and info["peak_lr"] == 3.0e-3
    assert info["schedule"]["name"] == "wsd" and info["data"]["phase"] == "stable"
    assert info["data"]["dataset_state"] == ckpt["dataset_state"]["train"]
    groups = info["optimizer"]["param_groups"]
    assert sorted(p for g in groups for p in g["params"]) == sorted(
        n.removeprefix("model.").replace("backbone.embedding.", "backbone.embeddings.")
        for n in optim["state"]
    )
    card = (out / "README.md").read_text()
    assert "pre-decay" in card and f"init_from.path={out}" in card and str(info["tokens_seen"]) in card
    # Still a plain HF model for transformers users.
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.model_type == "mamba"


def decay_overrides(corpus: dict[str, Path], root: Path, name: str, batches: int, *extra: str) -> list[str]:
    return [
        *tiny_overrides(corpus, root, run_name=name),
        f"max_duration={batches}ba",
        "eval_interval=null",
        "checkpoint.save_interval=1000ba",
        *extra,
    ]


def _decay_three_ways(corpus: dict[str, Path], run: Path, tmp_path: Path, batches: int) -> dict[str, Path]:
    pre_decay = run / "checkpoints" / "pre-decay" / "pre-decay-ba9.pt"
    export_cli(str(pre_decay), "--to", "hf", "--out", str(tmp_path / "release"), "--with-training-state")
    export_cli(str(pre_decay), "--to", "hf", "--out", str(tmp_path / "weights-only"))
    runs = {
        "checkpoint": [f"checkpoint.load_path={pre_decay}"],
        "release": [f"init_from.path={tmp_path / 'release'}"],
        "weights-only": [f"init_from.path={tmp_path / 'weights-only'}", "init_from.lr_rewarmup=0ba"],
    }
    return {
        name: fit(decay_overrides(corpus, tmp_path, name, batches, *extra), "yamls/tiny/decay.yaml")
        for name, extra in runs.items()
    }


def _final_weights(run: Path, batches: int) -> dict[str, torch.Tensor]:
    state = torch.load(
        run / "checkpoints" / f"ep0-ba{batches}-rank0.pt", map_location="cpu", weights_only=False
    )
    return state["state"]["model"]


def _losses(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss/train/total"] for r in read_jsonl(run / "metrics.jsonl") if "loss/train/total" in r
    }


def check_decay_equivalence(corpus: dict[str, Path], run: Path, tmp_path: Path, batches: int) -> None:
    runs = _decay_three_ways(corpus, run, tmp_path, batches)
    ref, rel = _final_weights(runs["checkpoint"], batches), _final_weights(runs["release"], batches)
    worst = max((ref[k] - rel[k]).abs().max().item() for k in ref)
    tail = max(1, batches // 4)
    for name, path in runs.items():  # the gap table (pytest -s)
        values = list(_losses(path).values())
        print(f"| {name} | {values[-1]:.4f} | last {tail} mean {sum(values[-tail:]) / tail:.4f} |")
    assert worst <= 1e-6, worst
    losses = _losses(runs["checkpoint"])
    assert len(losses) == batches
    assert _losses(runs["release"]) == pytest.approx(losses, rel=1e-6, abs=1e-6)
    # The weights-only release is measurably elsewhere: the comparison can fail.
    fresh = _final_weights(runs["weights-only"], batches)
    assert max((ref[k] - fresh[k]).abs().max().item() for k in ref) > 1e-4
    # The decay from the release records where its source stood, and the report draws it from there.
    recorded = json.loads((runs["release"] / "run.json").read_text())["init_from_source"]
    tokens = json.loads((tmp_path / "release" / "training_state.json").read_text())["tokens_seen"]
    assert recorded["tokens_seen"] == tokens and recorded["moments_restored"] is True
    assert start_tokens(runs["release"]) == start_tokens(runs["checkpoint"]) == tokens
    assert (
        json.loads((runs["weights-only"] / "run.json").read_text())["init_from_source"]["moments_restored"]
        is False
    )


def test_decay_from_release_equals_decay_from_checkpoint(
    corpus: dict[str, Path], stable_run: tuple[Path, RecordBatches], tmp_path: Path
) -> None:
    check_decay_equivalence(corpus, stable_run[0], tmp_path, batches=6)


@pytest.mark.slow
def test_40_batch_decay_from_release_equals_decay_from_checkpoint(
    corpus: dict[str, Path], stable_run: tuple[Path, RecordBatches], tmp_path: Path
) -> None:
    check_decay_equivalence(corpus, stable_run[0], tmp_path, batches=40)


def test_release_continues_the_data_order(
    corpus: dict[str, Path], stable_run: tuple[Path, RecordBatches], tmp_path: Path
) -> None:
    """A release of batch 6 with data_position: the new run trains on the source run's batches 7 and 8."""
    run, source = stable_run
    out = tmp_path / "release"
    export_cli(
        str(run / "checkpoints" / "ep0-ba6-rank0.pt"),
        "--to",
        "hf",
        "--out",
        str(out),
        "--with-training-state",
    )
    assert json.loads((out / "training_state.json").read_text())["checkpoint"] == "intermediate"
    seen = RecordBatches()
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="continued",
        max_duration="2ba",
        **{
            **STABLE,
            "scheduler.t_warmup": "0ba",
            "scheduler.t_decay": "1ba",
            "init_from.path": out,
            "init_from.data_position": "true",
        },
    )
    fit(overrides, "yamls/tiny/wsd.yaml", [seen])
    assert len(seen.batches) == 2
    for mine, theirs in zip(seen.batches, source.batches[6:8]):
        assert torch.equal(mine, theirs)
    assert not torch.equal(seen.batches[0], source.batches[0])  # not the first batch again


def test_data_position_of_another_mix_is_refused(
    corpus: dict[str, Path], stable_run: tuple[Path, RecordBatches], tmp_path: Path
) -> None:
    run, _ = stable_run
    out = tmp_path / "release"
    export_cli(
        str(run / "checkpoints" / "ep0-ba6-rank0.pt"),
        "--to",
        "hf",
        "--out",
        str(out),
        "--with-training-state",
    )
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="wrong-mix",
        **{**STABLE, "init_from.path": out, "init_from.data_position": "true", "data.phase": "decay"},
    )
    with pytest.raises(
        ValueError, match=r"init_from.data_position=true: the release stood in another data mix"
    ):
        build_trainer(prepare_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], overrides)))
    assert not (tmp_path / "wrong-mix").exists()


def test_with_training_state_needs_a_composer_checkpoint(
    stable_run: tuple[Path, RecordBatches], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common import cli

    run, _ = stable_run
    export_cli(str(run), "--to", "hf", "--out", str(tmp_path / "plain"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            export_main,
            [str(tmp_path / "plain"), "--to", "hf", "--out", str(tmp_path / "o"), "--with-training-state"],
        )
    assert exit_info.value.code == 2
    assert "carries no optimizer state" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_release_to_and_from_an_object_store(
    corpus: dict[str, Path],
    stable_run: tuple[Path, RecordBatches],
    tmp_path: Path,
    s3_bucket: str,  # noqa: F811
) -> None:
    """The pre-decay checkpoint on s3://, exported to s3:// with its training state; a decay started
    from the s3:// release equals the decay from the local Composer checkpoint."""
    from handover.weights import _store_and_key, download

    run, _ = stable_run
    pre_decay = run / "checkpoints" / "pre-decay" / "pre-decay-ba9.pt"
    store, key = _store_and_key(f"{s3_bucket}/ckpt/pre-decay-ba9.pt")
    store.upload_object(key, str(pre_decay))
    export_cli(
        f"{s3_bucket}/ckpt/pre-decay-ba9.pt",
        "--to",
        "hf",
        "--out",
        f"{s3_bucket}/release",
        "--with-training-state",
    )
    local = download(f"{s3_bucket}/release", tmp_path / "downloaded")
    info = json.loads((local / "training_state.json").read_text())
    assert info["checkpoint"] == "pre-decay" and info["batches_seen"] == 9
    assert f"init_from.path={s3_bucket}/release" in (local / "README.md").read_text()
    batches = 4
    reference = fit(
        decay_overrides(corpus, tmp_path, "checkpoint", batches, f"checkpoint.load_path={pre_decay}"),
        "yamls/tiny/decay.yaml",
    )
    remote = fit(
        decay_overrides(corpus, tmp_path, "remote", batches, f"init_from.path={s3_bucket}/release"),
        "yamls/tiny/decay.yaml",
    )
    ref, rel = _final_weights(reference, batches), _final_weights(remote, batches)
    assert max((ref[k] - rel[k]).abs().max().item() for k in ref) <= 1e-6
    assert (
        json.loads((remote / "run.json").read_text())["init_from_source"]["tokens_seen"]
        == info["tokens_seen"]
    )


@pytest.mark.slow
@pytest.mark.dist
def test_sharded_checkpoint_releases_the_same_moments(sharded_and_full: Path, tmp_path: Path) -> None:
    """The same 2-process FSDP2 run saved sharded (DCP) and full: both exports hold the same moments,
    equal to the full checkpoint's (read with torch.load)."""
    from safetensors import safe_open

    export_cli(
        str(sharded_and_full / "sharded"),
        "--to",
        "hf",
        "--out",
        str(tmp_path / "rs"),
        "--with-training-state",
    )
    full = sharded_and_full / "full" / "checkpoints" / "ep0-ba4-rank0.pt"
    optim = torch.load(full, map_location="cpu", weights_only=False)["state"]["optimizers"]["AdamW"]
    with safe_open(str(tmp_path / "rs" / "optimizer.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == 3 * len(optim["state"])
        for fqn, entry in optim["state"].items():
            name = fqn.removeprefix("model.").replace("backbone.embedding.", "backbone.embeddings.")
            for kind in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(f.get_tensor(f"{kind}.{name}"), entry[kind].float()), f"{kind}.{name}"
    info = json.loads((tmp_path / "rs" / "training_state.json").read_text())
    assert info["checkpoint"] == "final" and info["batches_seen"] == 4 and info["tokens_seen"] == 4 * 8 * 32
    assert info["lr"] == optim["param_groups"][0]["lr"]
