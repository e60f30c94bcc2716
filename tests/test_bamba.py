"""IBM's Bamba (HF ``BambaForCausalLM``) into this repository's hybrid and back; other hybrids refused.

The reference is transformers' own class: tiny random models saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import BambaConfig, BambaForCausalLM

from handover.hf_mamba import config_from_hf, export_hf
from handover.mamba_ssm import export_mamba_ssm
from handover.unsupported import UnsupportedCheckpoint
from handover.weights import load_model

TOL = dict(rtol=1e-4, atol=1e-4)
VOCAB = 96


def tiny_bamba(path: Path, seed: int = 0, **config: object) -> BambaForCausalLM:
    """A random Bamba saved by transformers: 4 layers, attention at 1 and 3 (GQA, half-rotary)."""
    torch.manual_seed(seed)
    settings: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_indices=[1, 3],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = BambaForCausalLM(BambaConfig(**{**settings, **config}))
    with torch.no_grad():  # move norms, D, dt_bias and biases off their init values
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "dt_bias", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def tokens(shape: tuple[int, int] = (2, 19)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"tie_word_embeddings": True, "attention_bias": True, "mamba_proj_bias": True},
        {"mamba_n_groups": 2, "partial_rotary_factor": 1.0, "rope_theta": 500.0, "attn_layer_indices": [0]},
    ],
    ids=["released-layout", "tied-biases", "groups-full-rotary"],
)
def test_import_and_export_match_transformers(variant: dict, tmp_path: Path) -> None:
    hf = tiny_bamba(tmp_path / "hf", **variant)
    ours = load_model(tmp_path / "hf", impl="torch")
    cfg = ours.config
    assert cfg.attn_layer_idx == sorted(hf.config.attn_layer_indices) and cfg.d_intermediate == 128
    ids = tokens()
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(ours(ids), expected, **TOL)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(ours, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["model_type"] == "bamba" and raw["attn_layer_indices"] == cfg.attn_layer_idx
    back = BambaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, **TOL)
        # mamba_ssm's format holds it too when its group norm and eps agree with mamba_ssm's
        if cfg.ssm.ngroups == 1:
            export_mamba_ssm(ours, tmp_path / "ms")
            again = load_model(tmp_path / "ms", impl="torch")
            torch.testing.assert_close(again(ids), expected, **TOL)


def test_generation_with_the_cache_equals_transformers_greedy(tmp_path: Path) -> None:
    hf = tiny_bamba(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", impl="torch")
    ids = tokens((1, 7))
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=6), theirs)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"intermediate_size": 100}, "intermediate_size=100"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"partial_rotary_factor": 0.375}, "partial_rotary_factor"),
    ],
)
def test_unrepresentable_bamba_settings_are_refused_by_name(setting: dict, message: str) -> None:
    config = BambaConfig(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                         mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8)  # fmt: skip
    raw = {**config.to_dict(), **setting}
    with pytest.raises(UnsupportedCheckpoint, match=message):
        config_from_hf(raw, "bamba/config.json")


def _other_hybrid_configs() -> dict[str, object]:
    import transformers

    names = {
        "jamba": "JambaConfig",
        "zamba": "ZambaConfig",
        "zamba2": "Zamba2Config",
        "falcon_h1": "FalconH1Config",
        "granitemoehybrid": "GraniteMoeHybridConfig",
        "nemotron_h": "NemotronHConfig",
    }
    return {t: getattr(transformers, c) for t, c in names.items() if hasattr(transformers, c)}


@pytest.mark.parametrize("model_type", sorted(_other_hybrid_configs()))
def test_other_hybrid_families_are_refused_naming_what_they_have(model_type: str, tmp_path: Path) -> None:
    from handover.bamba import OTHER_HYBRIDS

    config = _other_hybrid_configs()[model_type]()
    config.save_pretrained(tmp_path)  # the config.json transformers writes for that family
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == model_type
    family, has = OTHER_HYBRIDS[model_type]
    with pytest.raises(UnsupportedCheckpoint) as info:
        config_from_hf(raw, str(tmp_path / "config.json"))
    assert family in str(info.value) and has in str(info.value)


def test_decay_of_a_transformers_bamba_end_to_end(corpus: dict[str, Path], tmp_path: Path) -> None:
    """yamls/tiny/bamba_decay.yaml from a tiny Bamba saved by transformers: init_from loads it exactly,
    the decay trains, and the run exports back to HF Bamba and to mamba_ssm with the same logits."""
    from common import cli
    from handover.bamba import bamba_state_dict_to_ours
    from handover.weights import load_model
    from recipes.config import load_train_config
    from recipes.export import main as export_main
    from recipes.train import build_trainer, prepare_run
    from tests.conftest import StopAfter, tiny_overrides

    root = Path(__file__).resolve().parents[1]
    released = tmp_path / "released"
    hf = tiny_bamba(released, vocab_size=304, hidden_size=64, mamba_n_heads=8, mamba_chunk_size=16)
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="bamba",
        **{"init_from.path": released, "model.d_model": 64, "model.n_layer": 4},
    )
    trainer = build_trainer(
        prepare_run(load_train_config([root / "yamls/tiny/bamba_decay.yaml"], overrides)), [StopAfter(3)]
    )
    ours = trainer.state.model.model
    reference = bamba_state_dict_to_ours(hf.state_dict(), ours.config)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()

    decayed = load_model(tmp_path / "bamba")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    for to in ("hf", "mamba_ssm"):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(export_main, [str(tmp_path / "bamba"), "--to", to, "--out", str(tmp_path / to)])
        assert exit_info.value.code == 0
    back = BambaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = decayed(ids)
        torch.testing.assert_close(back(ids).logits, expected, **TOL)
        torch.testing.assert_close(load_model(tmp_path / "mamba_ssm")(ids), expected, **TOL)
        assert (back(ids).logits - hf(ids).logits).abs().max() > 1e-4  # the decay moved the weights
