"""Falcon-Mamba (TII; HF ``FalconMambaForCausalLM``): Mamba-1 with RMS-normalised dt, B and C.

The reference is transformers' own class: tiny random models saved with ``save_pretrained``, then
loaded here (import), and our export loaded back by transformers (export), logits within 1e-4.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM

from handover.hf_mamba import export_hf
from handover.mamba_ssm import export_mamba_ssm
from handover.weights import load_model
from models.config import MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

TOL = dict(rtol=1e-4, atol=1e-4)


def tiny_falcon_mamba(
    path: Path, tie: bool = False, vocab: int = 101, seed: int = 0, **config: object
) -> FalconMambaForCausalLM:
    """A random Falcon-Mamba saved by transformers; norms, D and biases moved off their init values."""
    torch.manual_seed(seed)
    settings: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        time_step_rank=6,
        use_bias=False,
        mixer_rms_eps=1e-3,  # large enough that a wrong eps shows in the logits
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = FalconMambaForCausalLM(FalconMambaConfig(**{**settings, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def tokens(vocab: int, shape: tuple[int, int] = (2, 13)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_and_export_match_transformers(tie: bool, tmp_path: Path) -> None:
    hf = tiny_falcon_mamba(tmp_path / "hf", tie=tie)
    ours = load_model(tmp_path / "hf", impl="torch")
    assert ours.config.ssm.b_c_dt_rms and ours.config.ssm.b_c_dt_rms_eps == 1e-3
    ids = tokens(101)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)[..., :101]
        torch.testing.assert_close(got, expected, **TOL)
        # The norms matter: without them the same weights give other logits.
        plain = load_model(tmp_path / "hf", impl="torch")
        for layer in plain.backbone.layers:
            layer.mixer.b_c_dt_rms_eps = None
        assert (plain(ids)[..., :101] - expected).abs().max() > 1e-2

    export_hf(
        ours, tmp_path / "out", special_token_ids={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    )
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "falcon_mamba" and raw["mixer_rms_eps"] == 1e-3
    back = FalconMambaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    assert (back.config.bos_token_id, back.config.eos_token_id, back.config.pad_token_id) == (1, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, **TOL)


def test_gradients_match_transformers(tmp_path: Path) -> None:
    hf = tiny_falcon_mamba(tmp_path / "hf").train()
    hf.config.use_mambapy = False
    ours = load_model(tmp_path / "hf", impl="torch").train()
    ids = tokens(101, (2, 9))
    hf(ids, labels=ids).loss.backward()
    logits = ours(ids)[:, :-1, :101]
    torch.nn.functional.cross_entropy(logits.reshape(-1, 101), ids[:, 1:].reshape(-1)).backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        hf_name = "backbone.embeddings.weight" if name == "backbone.embedding.weight" else name
        torch.testing.assert_close(p.grad, hf_grads[hf_name].grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_recurrent_generation_equals_the_full_forward(tmp_path: Path) -> None:
    tiny_falcon_mamba(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", impl="torch")
    ids = tokens(101, (2, 6))
    out = ours.generate(ids, max_new_tokens=5)
    with torch.no_grad():
        full = ours(out)
    assert torch.equal(out[:, 6:], full[:, 5:-1, :101].argmax(-1))


def test_mamba_ssm_format_refuses_the_norms(tmp_path: Path) -> None:
    model = MambaLMHeadModel(
        MambaConfig(d_model=32, n_layer=1, vocab_size=64, ssm=SSMConfig(b_c_dt_rms=True))
    )
    with pytest.raises(ValueError, match="b_c_dt_rms"):
        export_mamba_ssm(model, tmp_path / "ms")
    assert not (tmp_path / "ms").exists()
    with pytest.raises(ValueError, match="b_c_dt_rms=true is Falcon-Mamba's Mamba-1 mixer"):
        SSMConfig(layer="mamba2", b_c_dt_rms=True)


def test_decay_of_a_transformers_falcon_mamba_end_to_end(corpus: dict[str, Path], tmp_path: Path) -> None:
    """yamls/tiny/falcon_mamba_decay.yaml from a tiny Falcon-Mamba saved by transformers: init_from loads
    it exactly, the decay trains, recipes.export hands it back to transformers with the same logits, and
    recipes.evaluate of the release gives transformers' own cross-entropy."""
    from common import cli
    from recipes import evaluate
    from recipes.config import load_train_config
    from recipes.export import main as export_main
    from recipes.train import build_trainer, prepare_run
    from tests.conftest import StopAfter, tiny_overrides
    from tests.data_helpers import single_stream_dataset

    root = Path(__file__).resolve().parents[1]
    released = tmp_path / "released"
    hf = tiny_falcon_mamba(released, vocab=304, hidden_size=64, time_step_rank="auto", mixer_rms_eps=1e-6)
    overrides = tiny_overrides(
        corpus, tmp_path, run_name="fm", **{"init_from.path": released, "model.d_model": 64}
    )
    trainer = build_trainer(
        prepare_run(load_train_config([root / "yamls/tiny/falcon_mamba_decay.yaml"], overrides)),
        [StopAfter(3)],
    )
    ours = trainer.state.model.model
    assert ours.config.ssm.b_c_dt_rms
    reference = {k.replace("embeddings", "embedding"): v for k, v in hf.state_dict().items()}
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()

    with pytest.raises(SystemExit) as exit_info:
        cli.run(export_main, [str(tmp_path / "fm"), "--to", "hf", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 0
    decayed = load_model(tmp_path / "fm")
    back = FalconMambaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = tokens(300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, decayed(ids), **TOL)
        assert (back(ids).logits - hf(ids).logits).abs().max() > 1e-4  # the decay moved the weights

    stream = corpus["root"] / "mds" / "docs"
    report = tmp_path / "eval.json"
    tokenizer = str(corpus["tokenizer"])
    argv = [str(released), "--data", str(stream), "--tokenizer", tokenizer, "--json", str(report)]
    evaluate.main([*argv, "--batch-size", "4", "--no-progress"])
    got = json.loads(report.read_text())["metrics"]["all"]
    dataset = single_stream_dataset(tmp_path, stream, corpus["tokenizer"], split="val", batch_size=4)
    samples = list(dataset)
    del dataset
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            batch = {k: torch.stack([s[k] for s in samples[i : i + 4]]) for k in ("input_ids", "labels")}
            logits = hf(batch["input_ids"]).logits.double()
            ce += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
            ).item()
            n += int((batch["labels"] != -100).sum())
    assert got["tokens"] == n
    assert got["cross_entropy"] == pytest.approx(ce / n, abs=1e-4)


@pytest.mark.gpu
def test_kernel_path_applies_the_same_norms(tmp_path: Path) -> None:
    """mamba_ssm's causal_conv1d / selective_scan kernels with the norms against the PyTorch path and HF."""
    hf = tiny_falcon_mamba(tmp_path / "hf", vocab=128)
    torch_path = load_model(tmp_path / "hf", impl="torch").cuda().eval()
    kernel_path = load_model(tmp_path / "hf", impl="kernels").cuda().eval()
    ids = tokens(128, (2, 64)).cuda()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = hf.cuda()(ids).logits
        torch.testing.assert_close(kernel_path(ids), torch_path(ids), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(kernel_path(ids)[..., :128], reference, rtol=2e-3, atol=2e-3)
