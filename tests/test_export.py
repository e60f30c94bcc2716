"""recipes.export: a trained run handed on as HF transformers or mamba_ssm, checked with the upstream loaders."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from handover.weights import load_model, read_weights
from recipes.config import load_train_config
from recipes.export import main as export_main
from recipes.train import build_trainer, prepare_run
from tests.conftest import TINY_HYBRID, tiny_overrides
from tests.test_train import ROOT


@pytest.fixture(scope="module")
def trained_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-batch Mamba-1 run on the tiny corpus (its tokenizer has the ChatML tokens and template)."""
    root = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(
        corpus,
        root,
        run_name="m1",
        max_duration="4ba",
        eval_interval="null",
        **{"scheduler.t_warmup": "1ba", "scheduler.t_decay": "1ba"},
    )
    trainer = build_trainer(prepare_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], overrides)))
    trainer.fit()
    trainer.close()
    return root / "m1"


def run_cli(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        from common import cli

        cli.run(export_main, list(args))
    assert exit_info.value.code == 0


def test_hf_export_is_what_transformers_users_expect(trained_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

    out = tmp_path / "hf"
    run_cli(str(trained_run), "--to", "hf", "--out", str(out))  # the tokenizer the run recorded
    config = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert config["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
    assert config["pad_token_id"] == tok.convert_tokens_to_ids("<|pad|>")
    assert config["bos_token_id"] is None and config["torch_dtype"] == "float32"
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [config["eos_token_id"], tok.convert_tokens_to_ids("<|im_end|>")]
    # Normal permissions, not tempfile's 0600 / 0700.
    assert stat.S_IMODE(os.stat(out / "model.safetensors").st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~_umask()

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = tok("the river learns", return_tensors="pt")
    assert "token_type_ids" not in inputs
    theirs = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    ours = read_weights(trained_run).build().eval().generate(inputs["input_ids"], 12)
    stop = set(generation.eos_token_id)
    n = next((i + 1 for i, t in enumerate(ours[0, inputs["input_ids"].shape[1] :].tolist()) if t in stop), 12)
    assert theirs[0].tolist() == ours[0, : inputs["input_ids"].shape[1] + n].tolist()

    generator = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    text = generator("the river learns", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(theirs[0], skip_special_tokens=True)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _umask() -> int:
    from common.io import current_umask

    return current_umask()


def test_mamba_ssm_export_of_a_hybrid_checkpoint(
    corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        **TINY_HYBRID,
    )
    trainer = build_trainer(prepare_run(load_train_config([ROOT / "yamls/tiny/wsd.yaml"], overrides)))
    trainer.fit()
    trained = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    trainer.close()
    checkpoint = tmp_path / "hybrid" / "checkpoints" / "ep0-ba2-rank0.pt"
    run_cli(str(checkpoint), "--to", "mamba_ssm", "--out", str(tmp_path / "ms"))
    raw = json.loads((tmp_path / "ms" / "config.json").read_text())
    assert raw["attn_layer_idx"] == [1] and raw["ssm_cfg"]["layer"] == "Mamba2"
    again = load_model(tmp_path / "ms")
    for key, value in trained.items():
        assert torch.equal(again.state_dict()[key], value), key
    # HF's classes cannot hold it: one clear line, exit status 2.
    from common import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_main, [str(checkpoint), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    assert "format: mamba_ssm" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_export_of_a_missing_source_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_main, [str(tmp_path / "nope"), "--to", "hf", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err


def _checkpoint_with_record(trained_run: Path, tmp_path: Path, **record: str) -> Path:
    """The run's last checkpoint, copied with its HandoverRecord entries replaced."""
    ckpt = torch.load(trained_run / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    ckpt["state"]["callbacks"]["HandoverRecord"].update(record)
    path = tmp_path / "moved.pt"
    torch.save(ckpt, path)
    return path


def test_hf_export_states_the_recorded_ids_when_the_tokenizer_is_gone(
    trained_run: Path, corpus: dict[str, Path], tmp_path: Path
) -> None:
    from data.tokenizer import EOT, PAD, load_tokenizer

    moved = _checkpoint_with_record(trained_run, tmp_path, tokenizer=str(tmp_path / "elsewhere" / "tok"))
    run_cli(str(moved), "--to", "hf", "--out", str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tok = load_tokenizer(corpus["tokenizer"])
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.token_to_id(EOT), tok.token_to_id(PAD))
    assert config["bos_token_id"] is None  # the tokenizer has none: stated, not transformers' 0


def test_hf_export_without_known_ids_is_refused_naming_tokenizer(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common import cli

    moved = _checkpoint_with_record(
        trained_run, tmp_path, tokenizer=str(tmp_path / "elsewhere"), special_token_ids_json=""
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_main, [str(moved), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--tokenizer" in err and "special-token ids" in err
    assert not (tmp_path / "hf").exists()
