"""handover/reader.py: every command reads a checkpoint once, verifies it the same way, and
never runs what a checkpoint from elsewhere pickled."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common import cli
from handover import reader
from handover.reader import SAFE_GLOBALS
from recipes import evaluate, export, train
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.conftest import tiny_overrides
from tests.test_train import ROOT

WSD = str(ROOT / "yamls/tiny/wsd.yaml")


@pytest.fixture(scope="module")
def run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-batch Mamba-1 run with one monolithic checkpoint (its latest)."""
    root = tmp_path_factory.mktemp("runs")
    trainer = build_trainer(prepare_run(load_train_config([WSD], _overrides(corpus, root, "r"))))
    trainer.fit()
    trainer.close()
    return root / "r"


def _overrides(corpus: dict[str, Path], root: Path, name: str, **extra: object) -> list[str]:
    return tiny_overrides(
        corpus,
        root,
        run_name=name,
        max_duration="2ba",
        eval_interval="null",
        **{"scheduler.t_warmup": "1ba", "scheduler.t_decay": "1ba", **extra},
    )


def _latest(run: Path) -> Path:
    return (run / "checkpoints" / "latest-rank0.pt").resolve()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], tuple[int, int, int]]:
    """Counts, for one file, the reader's integrity checks, its loads, and every ``torch.load`` of it.

    The reader's memory of checked files is emptied first: each test is one command.
    """
    monkeypatch.setattr(reader, "_VERIFIED", {})
    monkeypatch.setattr(reader, "_KEPT", {})
    monkeypatch.setattr(reader, "CHECKS", reader.collections.Counter())
    monkeypatch.setattr(reader, "READS", reader.collections.Counter())
    loads: dict[str, int] = {}
    crc_reads: dict[str, int] = {}
    original_load, original_testzip = torch.load, zipfile.ZipFile.testzip

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            key = str(Path(f).resolve())
            loads[key] = loads.get(key, 0) + 1
        return original_load(f, *args, **kwargs)

    def testzip(self: zipfile.ZipFile) -> str | None:
        key = str(Path(self.filename).resolve())
        crc_reads[key] = crc_reads.get(key, 0) + 1
        return original_testzip(self)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(zipfile.ZipFile, "testzip", testzip)

    def count(path: Path) -> tuple[int, int, int]:
        key = str(path.resolve())
        return crc_reads.get(key, 0), reader.READS[key], loads.get(key, 0)

    return count


def _exit(main: Callable, args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.run(main, args)
    return int(info.value.code)


# ----------------------------------------------------------------------------------------------
# One read per file per command


def test_a_fresh_checkpoint_pickles_only_the_allow_listed_types(run: Path) -> None:
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(_latest(run)))
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    assert found and found <= allowed, found - allowed


def test_evaluation_reads_and_checks_the_checkpoint_once(run: Path, counted, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert _exit(evaluate.main, [str(run), "--max-batches", "1", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tokens_trained"] == 2 * 8 * 32  # the timestamp, from the same read
    assert counted(_latest(run)) == (1, 1, 1)


def test_export_reads_and_checks_the_checkpoint_once(run: Path, counted, tmp_path: Path) -> None:
    assert _exit(export.main, [str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert counted(_latest(run)) == (1, 1, 1)
    # A release is safetensors only: no pickle anyone would have to unpickle.
    assert {p.suffix for p in (tmp_path / "hf").iterdir()} <= {".safetensors", ".json", ".jinja"}


def test_resume_and_init_from_read_the_checkpoint_once(
    run: Path, corpus: dict[str, Path], counted, tmp_path: Path
) -> None:
    checkpoint = _latest(run)
    # checkpoint.load_path: checked (CRC, as data, shapes) and loaded by Composer from one read.
    # (max_duration past the checkpoint's batch 2: a load that would train nothing is refused)
    overrides = [
        *_overrides(corpus, tmp_path, "resumed", **{"checkpoint.load_path": checkpoint}),
        "max_duration=3ba",
    ]
    build_trainer(prepare_run(load_train_config([WSD], overrides))).close()
    assert counted(checkpoint) == (1, 1, 1)
    # init_from, a second command: again one check and one read.
    reader._VERIFIED.clear()
    overrides = _overrides(corpus, tmp_path, "init", **{"init_from.path": checkpoint})
    trainer = build_trainer(prepare_run(load_train_config([WSD], overrides)))
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        reference = torch.load(checkpoint, weights_only=True, mmap=True)["state"]["model"]
    assert torch.equal(trainer.state.model.model.lm_head.weight, reference["model.lm_head.weight"])
    trainer.close()
    assert counted(checkpoint) == (2, 2, 3)  # + the reference load just above


# ----------------------------------------------------------------------------------------------
# Corrupt files: exit 3, named, by every reader


def _corrupt_copy(checkpoint: Path, dest: Path) -> Path:
    dest.write_bytes(checkpoint.read_bytes())
    with zipfile.ZipFile(dest) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
    with dest.open("r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return dest


def test_a_corrupt_checkpoint_stops_export_and_init_from_with_exit_3(
    run: Path, corpus: dict[str, Path], tmp_path: Path, capsys
) -> None:
    bad = _corrupt_copy(_latest(run), tmp_path / "ep0-ba2-rank0.pt")
    assert _exit(export.main, [str(bad), "--to", "hf", "--out", str(tmp_path / "hf")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("stopped: ") and str(bad) in err and "CRC-32" in err
    assert not (tmp_path / "hf").exists()
    overrides = _overrides(corpus, tmp_path, "init", **{"init_from.path": bad})
    assert _exit(train.main, [WSD, *overrides]) == 3
    err = capsys.readouterr().err
    assert err.startswith("stopped: ") and str(bad) in err and "CRC-32" in err
    assert not (tmp_path / "init" / "run.json").exists()


# ----------------------------------------------------------------------------------------------
# A checkpoint from elsewhere is data, not code


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _crafted(run: Path, dest: Path, marker: Path) -> Path:
    """The run's real checkpoint with one more callback state, a ``_Payload``."""
    state = torch.load(_latest(run), map_location="cpu", weights_only=False)
    state["state"]["callbacks"]["Innocent"] = {"note": _Payload(marker)}
    torch.save(state, dest)
    return dest


def test_a_crafted_checkpoint_is_refused_by_every_command_and_never_runs(
    run: Path, corpus: dict[str, Path], tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    crafted = _crafted(run, tmp_path / "ep0-ba2-rank0.pt", marker)
    report_run = tmp_path / "decay"
    report_run.mkdir()
    (report_run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    (report_run / "run.json").write_text(json.dumps({"config": {"checkpoint": {"load_path": str(crafted)}}}))
    from eval import report

    commands = {
        "recipes.export": (export.main, [str(crafted), "--to", "hf", "--out", str(tmp_path / "hf")]),
        "recipes.evaluate": (evaluate.main, [str(crafted), "--data", str(tmp_path)]),
        "eval.report": (report.main, [str(report_run), "--out", str(tmp_path / "report")]),
        "init_from": (train.main, [WSD, *_overrides(corpus, tmp_path, "a", **{"init_from.path": crafted})]),
        "checkpoint.load_path": (
            train.main,
            [WSD, *_overrides(corpus, tmp_path, "b", **{"checkpoint.load_path": crafted})],
        ),
    }
    opt_in = {"init_from": "init_from.trust=true", "checkpoint.load_path": "checkpoint.trust=true"}
    for name, (main, args) in commands.items():
        assert _exit(main, args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "could run code" in err, (name, err)
        assert opt_in.get(name, "--trust-checkpoint") in err, (name, err)
        assert not marker.exists(), name
    assert not (tmp_path / "hf").exists() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The payload is live: the explicit opt-in reads it with full pickle, and it runs.
    _exit(export.main, [str(crafted), "--to", "hf", "--out", str(tmp_path / "hf"), "--trust-checkpoint"])
    assert marker.exists()


def test_a_crafted_sharded_metadata_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    import pickle

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    folder = tmp_path / "ep0-ba2"
    dcp.save({"state": {"model": {"model.w": torch.ones(4)}}}, checkpoint_id=str(folder), no_dist=True)
    with (folder / ".metadata").open("rb") as f:
        meta = pickle.load(f)
    meta.planner_data = _Payload(marker)
    with (folder / ".metadata").open("wb") as f:
        pickle.dump(meta, f)
    assert _exit(export.main, [str(folder), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "could run code" in err and "--trust-checkpoint" in err and not marker.exists()


def test_loading_a_mapped_checkpoint_drops_each_tensors_pages_once_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``release_pages_while_loading``: every tensor of a memory-mapped checkpoint has its pages dropped
    after it is copied (and the model holds the checkpoint's values); a state dict in ordinary
    memory is never touched (dropping its pages would zero it)."""
    from handover import tensor_files
    from models.config import MambaConfig, SSMConfig
    from models.mamba_lm import MambaLMHeadModel

    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=512, ssm=SSMConfig(d_state=8))
    source = MambaLMHeadModel(cfg)
    path = tmp_path / "ckpt.pt"
    torch.save({"state": {"model": source.state_dict()}}, path)
    dropped: list[int] = []
    real_drop = tensor_files.drop_mapped_pages
    monkeypatch.setattr(
        tensor_files, "drop_mapped_pages", lambda t: (dropped.append(t.numel()), real_drop(t))
    )

    mapped = reader.read_composer(path)["state"]["model"]
    model = MambaLMHeadModel(cfg)
    reader.release_pages_while_loading(model)
    model.load_state_dict(mapped)
    unique = {id(p) for p in source.parameters()}
    assert sorted(dropped) == sorted(t.numel() for t in mapped.values() if t.numel())  # each tensor, once
    assert len(unique) <= len(dropped)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    dropped.clear()
    in_memory = {k: v.clone() + 1 for k, v in source.state_dict().items()}
    model.load_state_dict(in_memory)
    assert dropped == []
    for key, value in in_memory.items():
        assert torch.equal(model.state_dict()[key], value), key
