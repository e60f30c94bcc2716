"""init_from's weight selection: which checkpoint tensor lands in which parameter, and every refusal
word for word. Complements tests/test_init_from.py (make mutants showed these unpinned there)."""

from __future__ import annotations

import re

import pytest
import torch
from composer.core import Time

from common.config import ConfigError
from handover.init_from import InitFromConfig, inherited_config, parse_rewarmup, select_weights
from handover.weights import ModelWeights
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

UNTIED = MambaConfig(d_model=32, n_layer=2, vocab_size=64)
TIED = MambaConfig(d_model=32, n_layer=2, vocab_size=64, tie_embeddings=True)


def checkpoint(cfg: MambaConfig) -> ModelWeights:
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg)
    return ModelWeights(model.config, {k: v.clone() for k, v in model.state_dict().items()}, "ref", "test")


def select(init: InitFromConfig, target: MambaConfig, ckpt: ModelWeights) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = MambaLMHeadModel(target).state_dict()
    return select_weights(init, target, ckpt, shapes)


def block_keys(n: int) -> list[str]:
    return [k for k in MambaLMHeadModel(UNTIED).state_dict() if k.startswith(f"backbone.layers.{n}.")]


def test_a_whole_copy_takes_every_tensor_from_its_own_name() -> None:
    ckpt = checkpoint(UNTIED)
    weights = select(InitFromConfig(path="ref"), UNTIED, ckpt)
    assert sorted(weights) == sorted(ckpt.state_dict)
    assert all(weights[k] is ckpt.state_dict[k] for k in weights)


def test_parts_left_out_are_not_copied() -> None:
    ckpt = checkpoint(UNTIED)
    no_embedding_no_norm = select(InitFromConfig(path="ref", embedding=False, final_norm=False), UNTIED, ckpt)
    assert sorted(no_embedding_no_norm) == sorted(block_keys(0) + block_keys(1) + ["lm_head.weight"])
    no_head = select(InitFromConfig(path="ref", lm_head=False), UNTIED, ckpt)
    assert sorted(no_head) == sorted(
        block_keys(0) + block_keys(1) + ["backbone.embedding.weight", "backbone.norm_f.weight"]
    )


def test_an_untied_model_from_a_tied_checkpoint_takes_the_embedding_as_its_head() -> None:
    ckpt = checkpoint(TIED)
    weights = select(InitFromConfig(path="ref"), UNTIED, ckpt)
    assert weights["lm_head.weight"] is ckpt.state_dict["backbone.embedding.weight"]


def test_a_tied_model_without_the_embedding_still_gets_its_head() -> None:
    """With a tied head, lm_head=true and embedding=false still copy the embedding: it is the head."""
    ckpt = checkpoint(TIED)
    weights = select(InitFromConfig(path="ref", embedding=False), TIED, ckpt)
    assert weights["backbone.embedding.weight"] is ckpt.state_dict["backbone.embedding.weight"]
    assert "lm_head.weight" not in weights  # the tied head is the embedding tensor itself
    fresh = select(InitFromConfig(path="ref", embedding=False, lm_head=False), TIED, ckpt)
    assert "backbone.embedding.weight" not in fresh


def test_selected_blocks_are_renumbered_in_order() -> None:
    ckpt = checkpoint(MambaConfig(d_model=32, n_layer=4, vocab_size=64))
    weights = select(InitFromConfig(path="ref", layers=[3, 1]), UNTIED, ckpt)
    for key in block_keys(0):
        assert weights[key] is ckpt.state_dict[key.replace("layers.0.", "layers.3.")]
    for key in block_keys(1):
        assert weights[key] is ckpt.state_dict[key.replace("layers.1.", "layers.1.")]
    first = select(InitFromConfig(path="ref", num_layers=2), UNTIED, ckpt)
    assert all(first[k] is ckpt.state_dict[k] for k in block_keys(0) + block_keys(1))


def test_source_layers_by_hand() -> None:
    assert InitFromConfig(path="x").source_layers(3) == [0, 1, 2]
    assert InitFromConfig(path="x", num_layers=2).source_layers(5) == [0, 1]
    assert InitFromConfig(path="x", layers=[4, 0]).source_layers(5) == [4, 0]


def test_inherited_config_renumbers_attention_blocks() -> None:
    hybrid = MambaConfig(
        d_model=32,
        n_layer=4,
        vocab_size=64,
        attn_layer_idx=[1, 3],
        attn=AttnConfig(num_heads=4),
        ssm=SSMConfig(layer="mamba2", d_state=8, headdim=16, chunk_size=8),
    )
    small = inherited_config(hybrid, [3, 0, 1])
    assert small.n_layer == 3 and small.attn_layer_idx == [0, 2]
    assert small.d_model == 32 and small.ssm == hybrid.ssm


def test_rewarmup_lengths() -> None:
    assert parse_rewarmup("20ba") == Time(20, "ba")
    assert parse_rewarmup("1e7tok") == Time(10_000_000, "tok")
    assert parse_rewarmup("0sp") == Time(0, "sp")


REFUSALS = [
    (
        lambda: select(
            InitFromConfig(path="ref"), MambaConfig(d_model=32, n_layer=3, vocab_size=64), checkpoint(UNTIED)
        ),
        "init_from.path=ref: the checkpoint has 2 blocks and model.n_layer=3: set model.n_layer=2, or choose "
        "blocks with init_from.num_layers / init_from.layers",
    ),
    (
        lambda: select(
            InitFromConfig(path="ref", layers=[0, 1]),
            MambaConfig(d_model=32, n_layer=3, vocab_size=64),
            checkpoint(UNTIED),
        ),
        "init_from.path=ref: init_from selects 2 blocks [0, 1] but model.n_layer=3: set model.n_layer=2",
    ),
    (
        lambda: select(InitFromConfig(path="ref", layers=[0, 2]), UNTIED, checkpoint(UNTIED)),
        "init_from.path=ref: init_from selects blocks [2], but the checkpoint has blocks 0..1",
    ),
    (
        lambda: select(InitFromConfig(path="ref"), TIED, checkpoint(UNTIED)),
        "init_from.path=ref: the checkpoint's head is untied from its embedding but model.tie_embeddings=true: "
        "set model.tie_embeddings=false (or init_from.lm_head=false)",
    ),
    (
        lambda: parse_rewarmup("3ep"),
        "init_from.lr_rewarmup='3ep' must be a length in ba, tok or sp (e.g. '20ba', '0ba')",
    ),
    (
        lambda: parse_rewarmup("-3ba"),
        "init_from.lr_rewarmup='-3ba' must be a length in ba, tok or sp (e.g. '20ba', '0ba')",
    ),
    (
        lambda: parse_rewarmup("soon"),
        "init_from.lr_rewarmup='soon' is not a time such as '20ba' or '1e7tok'",
    ),
]


@pytest.mark.parametrize(("call", "message"), REFUSALS)
def test_each_refusal_word_for_word(call, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_a_tied_model_may_start_from_an_untied_checkpoint_without_its_head() -> None:
    ckpt = checkpoint(UNTIED)
    weights = select(InitFromConfig(path="ref", lm_head=False), TIED, ckpt)
    assert weights["backbone.embedding.weight"] is ckpt.state_dict["backbone.embedding.weight"]


def test_every_config_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        InitFromConfig(path="", num_layers=-1, layers=[-1], lr_rewarmup="soon")
    assert str(info.value).splitlines()[1:] == [
        "  - init_from.path is empty: set it to a checkpoint, run folder or model directory",
        "  - init_from.num_layers=-1 must be >= 0",
        "  - init_from.num_layers=-1 and init_from.layers=[-1] are both set; use one (num_layers: the first n "
        "blocks; layers: an explicit list)",
        "  - init_from.layers=[-1] has negative block indices",
        "  - init_from.lr_rewarmup='soon' is not a time such as '20ba' or '1e7tok'",
    ]
    InitFromConfig(path="x", num_layers=0, layers=[0])  # block 0 is a valid index


def test_mamba2_only_settings_do_not_matter_between_mamba1_models() -> None:
    """headdim, ngroups and the gated norm's settings are Mamba-2's: a Mamba-1 model may differ in them."""
    ssm = SSMConfig(d_state=8, headdim=16, ngroups=2, gated_norm_eps=1e-3, gated_norm_per_group=False)
    target = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm=ssm)
    ckpt = checkpoint(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm=SSMConfig(d_state=8)))
    assert sorted(select(InitFromConfig(path="ref"), target, ckpt)) == sorted(ckpt.state_dict)


def test_a_mamba1_setting_that_keeps_the_shapes_is_named_with_the_checkpoint_value() -> None:
    ckpt = checkpoint(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm=SSMConfig(d_state=8)))
    target = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm=SSMConfig(d_state=8, b_c_dt_rms_eps=1e-3))
    message = (
        "init_from.path=ref does not fit this model: the model must compute what the checkpoint was trained "
        "to compute. Fix: set model.ssm.b_c_dt_rms_eps=1e-06."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        select(InitFromConfig(path="ref"), target, ckpt)


def test_every_differing_setting_of_a_hybrid_is_named() -> None:
    hybrid = MambaConfig(
        d_model=32,
        n_layer=2,
        vocab_size=64,
        attn_layer_idx=[1],
        attn=AttnConfig(num_heads=4),
        ssm=SSMConfig(layer="mamba2", d_state=8, headdim=16, chunk_size=8),
    )
    target = MambaConfig(
        **{
            **hybrid.__dict__,
            "norm_epsilon": 1e-3,
            "ssm": SSMConfig(layer="mamba2", d_state=8, headdim=16, chunk_size=8, gated_norm_eps=1e-3),
            "attn": AttnConfig(num_heads=4, rotary_emb_dim=8),
        }
    )
    with pytest.raises(ValueError) as info:
        select(InitFromConfig(path="ref"), target, checkpoint(hybrid))
    assert str(info.value).endswith(
        "Fix: set model.norm_epsilon=1e-05, model.ssm.gated_norm_eps=1e-05, model.attn.rotary_emb_dim=0."
    )
