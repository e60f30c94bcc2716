"""Initialisation: meta-device construction + param_init_fn equals eager construction."""

from __future__ import annotations

import math

import pytest
import torch

from models.composer_model import optimizer_param_groups
from models.config import preset
from models.mamba_lm import MambaLMHeadModel


def is_deterministic(key: str, mixer: str) -> bool:
    """Tensors whose initial value does not depend on the random generator."""
    if key.endswith(("dt_proj.bias", "dt_bias", "conv1d.bias")):  # log-uniform dt / PyTorch's conv init
        return False
    if key.endswith("mixer.A_log"):
        return mixer == "mamba1"  # S4D-real for Mamba-1, uniform per head for Mamba-2
    return key.endswith(("mixer.D", "norm.weight", "norm2.weight", "norm_f.weight", ".bias"))


def build_on_meta(name: str) -> MambaLMHeadModel:
    with torch.device("meta"):
        model = MambaLMHeadModel(preset(name))
    model.to_empty(device="cpu")  # what Composer's FSDP does: values and Parameter attributes are lost
    for module in model.modules():
        model.param_init_fn(module)
    return model


@pytest.mark.parametrize("name", ["debug", "debug-mamba2", "debug-hybrid"])
def test_meta_init_equals_eager(name: str) -> None:
    eager, meta = MambaLMHeadModel(preset(name)), build_on_meta(name)
    eager_sd, meta_sd = eager.state_dict(), meta.state_dict()
    assert eager_sd.keys() == meta_sd.keys()
    deterministic = [k for k in eager_sd if is_deterministic(k, eager.config.ssm.layer)]
    assert deterministic
    for key in deterministic:
        assert torch.equal(eager_sd[key], meta_sd[key]), key
    if name == "debug":  # S4D-real: A_log[e] = log(1..N) for every channel e
        a_log = meta_sd["backbone.layers.0.mixer.A_log"]
        assert torch.equal(a_log[3], torch.log(torch.arange(1, 9, dtype=torch.float32)))
    for model in (eager, meta):
        check_random_ranges(model)


def check_random_ranges(model: MambaLMHeadModel) -> None:
    cfg = model.config
    s = cfg.ssm
    for name, p in model.named_parameters():
        if name.endswith(("dt_proj.bias", "dt_bias")):
            dt = torch.nn.functional.softplus(p.double())
            assert dt.min() >= s.dt_init_floor * 0.999 and dt.min() >= s.dt_min * 0.999, name
            assert dt.max() <= s.dt_max * 1.001, name
        elif name.endswith("dt_proj.weight"):
            assert p.abs().max() <= cfg.dt_rank**-0.5 * s.dt_scale
        elif name.endswith("mixer.A_log") and s.layer == "mamba2" and p.dim() == 1:
            A = p.exp()
            assert A.min() >= s.A_init_min - 1e-5 and A.max() <= s.A_init_max + 1e-5
        elif name == "backbone.embedding.weight":
            assert abs(p.std().item() - cfg.initializer_range) < 0.1 * cfg.initializer_range
        elif name.endswith(("mixer.out_proj.weight", "mlp.fc2.weight")):
            # kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in), then / sqrt(n_layer): mamba_ssm's
            # MambaLMHeadModel.__init__ re-runs _init_weights with n_residuals_per_layer=1 after
            # MixerModel's pass with 2 (MLPs), and the re-drawn value is the one that stays.
            bound = 1 / math.sqrt(p.shape[1]) / math.sqrt(cfg.n_layer)
            assert p.abs().max() <= bound + 1e-7 and p.abs().max() > 0.9 * bound, name
        elif name.endswith("in_proj.weight"):
            assert p.abs().max() <= 1 / math.sqrt(p.shape[1]) + 1e-7


def test_biases_zero_and_fp32_dynamics() -> None:
    model = MambaLMHeadModel(preset("debug-hybrid"))
    for name, p in model.named_parameters():
        if name.endswith(("in_proj.bias", "out_proj.bias")):
            assert torch.count_nonzero(p) == 0, name
        if name.endswith(("A_log", ".D", "dt_bias")):
            assert p.dtype == torch.float32


def test_weight_decay_groups() -> None:
    model = MambaLMHeadModel(preset("debug-hybrid"))
    decay, no_decay = optimizer_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    layer0 = {
        n.removeprefix("backbone.layers.0.") for n in no_decay["names"] if n.startswith("backbone.layers.0.")
    }
    assert layer0 == {
        "norm.weight",
        "mixer.dt_bias",
        "mixer.A_log",
        "mixer.D",
        "mixer.conv1d.bias",
        "mixer.norm.weight",
        "norm2.weight",
    }
    attn = {
        n.removeprefix("backbone.layers.1.") for n in no_decay["names"] if n.startswith("backbone.layers.1.")
    }
    assert attn == {"norm.weight", "mixer.in_proj.bias", "mixer.out_proj.bias", "norm2.weight"}
    assert "backbone.norm_f.weight" in no_decay["names"]
    assert set(decay["names"]) >= {
        "backbone.embedding.weight",
        "lm_head.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.2.mlp.fc2.weight",
    }
    assert len(decay["names"]) + len(no_decay["names"]) == len(list(model.parameters()))
    m1 = MambaLMHeadModel(preset("debug"))
    no_decay_m1 = optimizer_param_groups(m1, 0.1)[1]["names"]
    assert "backbone.layers.0.mixer.dt_proj.bias" in no_decay_m1
    assert "backbone.layers.0.mixer.dt_proj.weight" not in no_decay_m1
