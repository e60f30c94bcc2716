"""Interrupted checkpoint uploads on an object store are set aside before an autoresume
(handover/integrity.py ``recover_object_store_folder``), against a real S3 endpoint on
loopback (moto's server, tests/s3_server.py)."""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from composer.utils import S3ObjectStore, create_symlink_file

from handover.integrity import QUARANTINE, latest_on_object_store, recover_before_resume
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.conftest import StopAfter, tiny_overrides
from tests.s3_server import BUCKET, list_keys, s3_bucket  # noqa: F401  (s3_bucket is a fixture)

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/r/checkpoints"


@functools.cache
def _store() -> S3ObjectStore:
    return S3ObjectStore(bucket=BUCKET)


def _read(key: str, tmp: Path) -> bytes:
    local = tmp / "read" / key.replace("/", "_")
    local.parent.mkdir(exist_ok=True)
    _store().download_object(key, str(local), overwrite=True)
    return local.read_bytes()


def _sharded(tmp: Path, seed: int) -> dict[str, Path]:
    """A real torch.distributed.checkpoint folder (one process): ``.metadata`` and its shard file."""
    folder = tmp / f"dcp{seed}"
    state = {"model": {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return {p.name: p for p in sorted(folder.iterdir())}


def _upload_sharded(prefix: str, files: dict[str, Path], only: list[str] | None = None) -> None:
    for name, path in files.items():
        if only is None or name in only:
            _store().upload_object(f"{prefix}/{name}", str(path))


def _point_latest(folder: str, target: str, tmp: Path) -> None:
    link = tmp / "latest-rank0.pt.symlink"
    create_symlink_file(target, link)  # Composer's own pointer file, as its CheckpointSaver writes it
    _store().upload_object(f"{folder}/latest-rank0.pt.symlink", str(link))


@pytest.fixture
def clean_bucket(s3_bucket: str) -> str:  # noqa: F811
    yield s3_bucket
    store = _store()
    for key in list_keys():
        store.client.delete_object(Bucket=BUCKET, Key=key)


def test_newer_than_latest_moves_to_quarantine(
    clean_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _sharded(tmp_path, 1)
    shard = next(n for n in files if n.endswith(".distcp"))
    _upload_sharded(f"{RUN}/ep0-ba1", files)  # complete, and latest names it
    _point_latest(RUN, f"{RUN}/ep0-ba1", tmp_path)
    _upload_sharded(f"{RUN}/ep0-ba2", files, only=[".metadata", shard])  # a kill mid-upload of batch 2
    _store().upload_object(f"{RUN}/ep0-ba3-rank0.pt", str(files[shard]))  # a stray monolithic object
    # The pre-decay folder (no pointer of its own): batch 1 is covered by latest, batch 2 is not.
    _upload_sharded(f"{RUN}/pre-decay/ep0-ba1", files)
    _upload_sharded(f"{RUN}/pre-decay/ep0-ba2", files, only=[".metadata"])
    kept = {k: _read(k, tmp_path) for k in [*list_keys(f"{RUN}/ep0-ba1/"), f"{RUN}/latest-rank0.pt.symlink"]}
    moved = {k: _read(k, tmp_path) for k in list_keys(f"{RUN}/ep0-ba2/")}

    with caplog.at_level(logging.WARNING):
        assert recover_before_resume(f"{clean_bucket}/{RUN}", f"{clean_bucket}/{RUN}/pre-decay") is None

    keys = list_keys()
    for key, data in kept.items():  # untouched, byte for byte
        assert _read(key, tmp_path) == data, key
    assert latest_on_object_store(f"{clean_bucket}/{RUN}") == f"{RUN}/ep0-ba1"
    assert not [k for k in keys if k.startswith((f"{RUN}/ep0-ba2/", f"{RUN}/ep0-ba3"))]
    quarantine = [k for k in keys if k.startswith(f"{RUN}/{QUARANTINE}/")]
    assert len(quarantine) == 3
    for key, data in moved.items():
        (twin,) = [
            q
            for q in quarantine
            if q.startswith(f"{RUN}/{QUARANTINE}/ep0-ba2.") and q.endswith(key.rsplit("/", 1)[1])
        ]
        assert _read(twin, tmp_path) == data
    assert [q for q in quarantine if "/ep0-ba3-rank0.pt." in q]
    assert sorted(k for k in keys if k.startswith(f"{RUN}/pre-decay/ep0-ba1/")) == sorted(
        f"{RUN}/pre-decay/ep0-ba1/{n}" for n in files
    )
    assert not [k for k in keys if k.startswith(f"{RUN}/pre-decay/ep0-ba2/")]
    assert [k for k in keys if k.startswith(f"{RUN}/pre-decay/{QUARANTINE}/ep0-ba2.")]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("ep0-ba2", "ep0-ba3-rank0.pt", "pre-decay/ep0-ba2"):
        assert f"{RUN}/{name} is not resumable" in warned, name


def test_without_latest_every_checkpoint_moves(clean_bucket: str, tmp_path: Path) -> None:
    files = _sharded(tmp_path, 2)
    _upload_sharded(f"{RUN}/ep0-ba1", files)
    _upload_sharded(f"{RUN}/ep0-ba2", files, only=[".metadata"])
    _store().upload_object(f"{RUN}/notes.txt", str(files[".metadata"]))  # not a checkpoint: stays

    assert recover_before_resume(f"{clean_bucket}/{RUN}") is None

    keys = list_keys()
    assert f"{RUN}/notes.txt" in keys
    assert not [k for k in keys if k.startswith((f"{RUN}/ep0-ba1/", f"{RUN}/ep0-ba2/"))]
    moved = sorted(k.split("/")[4].split(".")[0] for k in keys if k.startswith(f"{RUN}/{QUARANTINE}/"))
    assert moved == ["ep0-ba1"] * len(files) + ["ep0-ba2"]
    # A second recovery finds nothing left to move.
    assert recover_before_resume(f"{clean_bucket}/{RUN}") is None
    assert list_keys() == keys


def test_unreachable_store_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    message = recover_before_resume(f"s3://{BUCKET}/{RUN}")
    assert message is not None
    assert message.startswith(f"could not set aside the interrupted checkpoints of s3://{BUCKET}/{RUN}")
    assert "EndpointConnectionError" in message or "Could not connect" in message
    assert os.environ["S3_ENDPOINT_URL"].endswith(str(port))


@pytest.mark.slow  # three Trainer runs with Composer's upload workers: ~90 s on 2 busy cores
def test_a_run_resumes_past_an_interrupted_upload(
    clean_bucket: str, corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same weights as an uninterrupted run: a stray ep0-ba4 object (a kill during its upload,
    before latest moved) is set aside, the run resumes from ba3 and writes its own ba4."""
    monkeypatch.chdir(tmp_path)  # Composer's autoresume caches remote checkpoints under the cwd

    def run(name: str, stop: int | None = None) -> dict[str, torch.Tensor]:
        cfg = load_train_config(
            [ROOT / "yamls/tiny/wsd.yaml"],
            [
                *tiny_overrides(corpus, tmp_path / name, eval_interval="null", max_duration="6ba"),
                "scheduler.t_warmup=2ba",
                "scheduler.t_decay=0.25",
                "checkpoint.save_interval=1ba",
                f"checkpoint.save_folder={clean_bucket}/{name}/checkpoints",
                # Composer polls the store for a checkpoint's objects before it moves latest, every
                # 30 s by default: on loopback they are there within milliseconds.
                "checkpoint.remote_poll_seconds=0.05",
            ],
        )
        trainer = build_trainer(prepare_run(cfg), extra_callbacks=[StopAfter(stop)] if stop else None)
        trainer.fit()
        weights = copy.deepcopy(trainer.state.model.model.state_dict())
        trainer.close()
        return weights

    straight = run("a")
    run("b", stop=3)
    folder = "b/checkpoints"
    assert latest_on_object_store(f"{clean_bucket}/{folder}") == f"{folder}/ep0-ba3-rank0.pt"
    stray = tmp_path / "stray.pt"
    stray.write_bytes(_read(f"{folder}/ep0-ba3-rank0.pt", tmp_path)[:1000])  # half-uploaded ba4
    _store().upload_object(f"{folder}/ep0-ba4-rank0.pt", str(stray))
    resumed = run("b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    (moved,) = [k for k in list_keys(f"{folder}/{QUARANTINE}/") if "/ep0-ba4-rank0.pt." in k]
    assert _read(moved, tmp_path) == stray.read_bytes()
    assert len(_read(f"{folder}/ep0-ba4-rank0.pt", tmp_path)) > len(stray.read_bytes())  # the run's own
    assert latest_on_object_store(f"{clean_bucket}/{folder}") == f"{folder}/ep0-ba6-rank0.pt"
