"""Object stores end to end, against a real S3 endpoint on loopback (moto's server, tests/s3_server.py):
a conversion to s3://, a training run reading it with its checkpoints and pre-decay checkpoint on
s3://, an interrupted run resumed from s3://, init_from and an export from s3:// to s3://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from callbacks.jsonl_logger import read_jsonl
from data.convert import ConvertConfig, convert
from data.sources import SourceSpec
from handover.export import export
from handover.weights import download, read_weights
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.data_helpers import make_docs, make_tokenizer, write_jsonl, write_mixture
from tests.s3_server import list_keys, s3_bucket  # noqa: F401  (s3_bucket is a fixture)
from tests.test_train import ROOT

pytestmark = pytest.mark.slow


def overrides(root: Path, tok: Path, mixture: Path, bucket: str, **extra: object) -> list[str]:
    settings = {
        "run_root": root,
        "run_name": "remote",
        "tokenizer": tok,
        "data.mixture": mixture,
        "model.d_model": 32,
        "model.n_layer": 2,
        "model.vocab_size": 300,
        "model.ssm.d_state": 8,
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 8,
        "max_duration": "8ba",
        "eval_interval": "null",
        "checkpoint.save_interval": "2ba",
        "checkpoint.save_folder": f"{bucket}/runs/{{run_name}}/checkpoints",
        # The `latest` link waits for the checkpoint's objects, checked every 30 s by default: on
        # loopback they are there at once (recipes/train.py set_remote_poll).
        "checkpoint.remote_poll_seconds": 0.05,
        "logging.progress_bar": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def test_convert_train_resume_init_from_and_export_on_s3(
    s3_bucket: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Composer's autoresume caches a remote checkpoint under a local folder named like the URI
    # ("s3:/bucket/...") in the working directory: keep it inside this test's folder.
    monkeypatch.chdir(tmp_path)
    # 1. data.convert --out s3://... (Streaming's uploader); the loader streams it back.
    tok = make_tokenizer(tmp_path / "tok", vocab_size=300)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in make_docs(300, seed=3)])
    cfg = ConvertConfig(
        sources=[SourceSpec(path=str(docs))],
        tokenizer=str(tok),
        out=f"{s3_bucket}/mds/docs",
        seq_len=32,
        val_fraction=0.1,
    )
    stats = convert(cfg)
    keys = list_keys("mds/docs/")
    assert (
        "mds/docs/stats.json" in keys
        and "mds/docs/train/index.json" in keys
        and "mds/docs/val/index.json" in keys
    )
    assert any(k.endswith(".mds") or k.endswith(".mds.zstd") for k in keys)
    with pytest.raises(FileExistsError, match="already holds a converted stream"):
        convert(cfg)
    mixture = write_mixture(
        tmp_path / "mix.yaml",
        {
            "stable": {
                "docs": {
                    "remote": f"{s3_bucket}/mds/docs",
                    "local": str(tmp_path / "cache"),
                    "proportion": 1.0,
                }
            }
        },
    )

    # 2. A run with checkpoints on s3://: 4 batches (WSD over 4, its stable phase ends after batch 3:
    # the pre-decay checkpoint), then the same run extended to 8 batches, resumed from s3://.
    settings = overrides(
        tmp_path / "runs",
        tok,
        mixture,
        s3_bucket,
        **{"scheduler.t_warmup": "2ba", "scheduler.t_decay": "1ba"},
    )
    run_cfg = load_train_config([ROOT / "yamls/tiny/wsd.yaml"], [*settings, "max_duration=4ba"])
    trainer = build_trainer(prepare_run(run_cfg))
    trainer.fit()
    trainer.close()
    assert "runs/remote/checkpoints/ep0-ba4-rank0.pt" in list_keys("runs/remote/")
    import shutil

    shutil.rmtree(tmp_path / "runs")  # nothing local survives: the resume must come from s3://
    trainer = build_trainer(prepare_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], settings)))
    assert int(trainer.state.timestamp.batch) == 4  # autoresumed from the object store
    trainer.fit()
    final = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    trainer.close()
    keys = list_keys("runs/remote/")
    assert "runs/remote/checkpoints/ep0-ba8-rank0.pt" in keys
    assert (
        "runs/remote/checkpoints/pre-decay/pre-decay-ba3.pt" in keys
    )  # the pre-decay CheckpointSaver uploads it
    steps = [r["step"] for r in read_jsonl(run_cfg.run_dir / "metrics.jsonl") if "loss/train/total" in r]
    assert steps == [4, 5, 6, 7]
    assert stats["splits"]["train"]["documents"] > 0

    # 3. read_weights of the s3:// run folder: its latest checkpoint, with the recorded config.
    latest = read_weights(f"{s3_bucket}/runs/remote/checkpoints")
    for key, value in final.items():
        assert torch.equal(latest.state_dict[key], value), key
    assert latest.config.d_model == 32

    # 4. init_from the pre-decay checkpoint on s3:// (weights only).
    pre_decay = f"{s3_bucket}/runs/remote/checkpoints/pre-decay/pre-decay-ba3.pt"
    expected = read_weights(pre_decay).state_dict
    decay = load_train_config(
        [ROOT / "yamls/tiny/decay.yaml"],
        [
            *overrides(tmp_path / "runs", tok, mixture, s3_bucket, run_name="decay", max_duration="2ba"),
            f"init_from.path={pre_decay}",
            "data.phase=stable",
        ],
    )
    trainer = build_trainer(prepare_run(decay))
    for key, value in trainer.state.model.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    trainer.close()

    # 5. Export from the s3:// run folder to s3://, then load it with transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export(f"{s3_bucket}/runs/remote/checkpoints", "hf", f"{s3_bucket}/exports/remote", tokenizer=str(tok))
    local = download(f"{s3_bucket}/exports/remote", tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(local).eval()
    ids = AutoTokenizer.from_pretrained(local)("the river", return_tensors="pt")["input_ids"]
    ours = latest.build().eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    assert json.loads((local / "config.json").read_text())["eos_token_id"] == 0
