"""Strict config loading: YAML + overrides onto dataclasses, with errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from models.config import PRESETS, MambaConfig, preset
from models.mamba_lm import MambaLMHeadModel


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge(tmp_path: Path) -> None:
    path = write(tmp_path, "d_model: 96\nssm:\n  layer: mamba2\n  headdim: 32\n")
    cfg = load_config(MambaConfig, [path], ["n_layer=3", "ssm.d_state=24"])
    assert (cfg.d_model, cfg.n_layer, cfg.ssm.layer, cfg.ssm.headdim, cfg.ssm.d_state) == (
        96,
        3,
        "mamba2",
        32,
        24,
    )
    assert cfg.nheads == 96 * 2 // 32


def test_unknown_key_suggests_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'ssm.d_stat'.*did you mean 'ssm.d_state'"):
        load_config(MambaConfig, [write(tmp_path, "ssm:\n  d_stat: 8\n")])
    with pytest.raises(ConfigError, match=r"'n_layers'.*command line.*did you mean 'n_layer'"):
        load_config(MambaConfig, [], ["n_layers=4"])


def test_wrong_type_names_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"bad value for config key 'd_model'.*'wide'"):
        load_config(MambaConfig, [write(tmp_path, "d_model: wide\n")])


def test_cross_field_check_names_key_and_fix() -> None:
    with pytest.raises(ValueError, match=r"model.ssm.headdim=48 must divide d_inner"):
        load_config(MambaConfig, [], ["ssm.layer=mamba2", "ssm.headdim=48"])
    with pytest.raises(ValueError, match=r"model.attn_layer_idx has \[5\] outside"):
        load_config(MambaConfig, [], ["n_layer=2", "attn_layer_idx=[5]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(MambaConfig, [], ["n_layer"])


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(MambaConfig, [tmp_path / "nope.yaml"])


def test_unknown_preset_lists_valid() -> None:
    with pytest.raises(ValueError, match="valid presets: debug"):
        preset("2b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta(name: str) -> None:
    import torch

    with torch.device("meta"):
        model = MambaLMHeadModel(preset(name))
    n = sum(p.numel() for p in model.parameters())
    # Published sizes: mamba_ssm's mamba-130m (129M) and -370m (372M); the paper's 0.5B
    # ablation model and Mambaoutai 1.6B.
    expected = {"130m": (129e6, 0.005), "370m": (372e6, 0.005), "0.5b": (0.5e9, 0.02), "1.6b": (1.6e9, 0.02)}
    if name in expected:
        size, rel = expected[name]
        assert n == pytest.approx(size, rel=rel)
