"""Three faults met from outside, as a user meets them, each fixed (issue 16, section 4).

- a NaN that comes back after every loss-spike rollback: the CLI's one ``stopped:`` line, exit 3;
- a kill while the pre-decay checkpoint is written: the restart removes its temporary file;
- a deleted shard of a local stream: "missing", naming the file and the fix, never "re-download".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from common import failpoints
from common.config import ConfigError
from data.loader import DataConfig, ShardError, build_dataset
from data.shared_memory import clean_stale_shared_memory
from data.sources import SourceSpec
from recipes import train
from recipes.config import load_train_config
from recipes.plan import plan_run
from tests.conftest import tiny_overrides
from tests.data_helpers import convert_sources, make_docs, write_jsonl, write_mixture

ROOT = Path(__file__).resolve().parents[1]
WSD = ["scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]


@pytest.mark.slow
def test_a_nan_after_every_rollback_stops_with_one_line_and_exit_3(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(failpoints.ENV, "nan_loss@3+")  # batch 3 and every one after it
    monkeypatch.setattr(failpoints, "_hits", Counter())
    spike = {
        "callbacks.loss_spike.warmup_batches": 2,
        "callbacks.loss_spike.window": 4,
        "callbacks.loss_spike.max_retries": 1,
        "eval_interval": "null",
    }
    argv = [str(ROOT / "yamls/tiny/wsd.yaml"), *tiny_overrides(corpus, tmp_path, **spike), *WSD]
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as info:
        train.cli.run(train.main, argv)
    torch.set_num_threads(threads)  # main() sizes the threads of this process
    err = capsys.readouterr().err
    assert info.value.code == 3, err[-3000:]
    assert "Traceback" not in err
    assert "stopped: training stopped: loss nan at batch" in err
    assert "after 1 rollbacks without recovery (callbacks.loss_spike.max_retries=1)" in err


def test_a_restart_removes_what_a_killed_pre_decay_write_left(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    cfg = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], [*tiny_overrides(corpus, tmp_path), *WSD])
    checkpoints = cfg.run_dir / "checkpoints"
    # What install_atomic_checkpoint_writes leaves when the process dies mid-write, in both folders.
    leftovers = [
        checkpoints / "pre-decay" / ".tmp-4242-pre-decay-ba6.pt",
        checkpoints / ".tmp-4242-ep0-ba4-rank0.pt",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    trainer = train.build_trainer(train.prepare_run(cfg))
    trainer.close()
    assert [p for p in leftovers if p.exists()] == []


@pytest.fixture
def local_stream(corpus: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A local stream of several shards (no remote), and its mixture."""
    clean_stale_shared_memory()
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(300, seed=5)])
    stream = tmp_path / "mds"
    convert_sources(stream, corpus["tokenizer"], [SourceSpec(path=str(docs))], shard_size="2kb")
    mixture = write_mixture(
        tmp_path / "mix.yaml", {"stable": {"docs": {"local": str(stream), "proportion": 1.0}}}
    )
    return stream, mixture


def test_a_deleted_local_shard_is_named_missing_before_the_run(
    corpus: dict[str, Path], local_stream: tuple[Path, Path], tmp_path: Path
) -> None:
    stream, mixture = local_stream
    shard = stream / "train" / "shard.00001.mds.zstd"
    shard.unlink()
    with pytest.raises(ConfigError) as info:
        overrides = tiny_overrides(corpus, tmp_path, **{"data.mixture": mixture, "eval_interval": "null"})
        plan_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], [*overrides, *WSD]), world=1)
    message = str(info.value)
    assert f"shard file {shard} (listed in {stream / 'train' / 'index.json'}) is missing" in message
    assert "no remote copy to download it from: restore the file, or re-run data.convert" in message
    assert "cache" not in message and "corrupt" not in message


def test_a_local_shard_deleted_during_the_run_is_named_missing(
    corpus: dict[str, Path], local_stream: tuple[Path, Path]
) -> None:
    stream, mixture = local_stream
    dataset = build_dataset(DataConfig(mixture=str(mixture), shuffle=False), corpus["tokenizer"], 4)
    shard = stream / "train" / "shard.00001.mds.zstd"
    shard.unlink()
    with pytest.raises(ShardError) as info:
        list(dataset)
    message = str(info.value)
    assert f"shard file {shard} is missing" in message
    assert "no remote copy to download it from: restore the file, or re-run data.convert" in message
    assert "cache" not in message and "corrupt" not in message
