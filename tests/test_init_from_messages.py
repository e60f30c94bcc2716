"""init_from's refusals that the selection tests leave open, word for word: the tokenizer that
outgrows the checkpoint, several problems at once, tensors only one side has, and the attention
settings that change shapes (the mutation tests' reference, ``python -m tests.mutants init_from``)."""

from __future__ import annotations

import re

import pytest
import torch

from handover.init_from import InitFromConfig, select_weights
from handover.weights import ModelWeights
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel

UNTIED = MambaConfig(d_model=32, n_layer=2, vocab_size=64)  # 64 rows: already a multiple of 8
NOT_FIT = "init_from.path=ref does not fit this model: "
MUST = "the model must compute what the checkpoint was trained to compute."


def checkpoint(cfg: MambaConfig) -> ModelWeights:
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg)
    return ModelWeights(model.config, {k: v.clone() for k, v in model.state_dict().items()}, "ref", "test")


def select(
    init: InitFromConfig, target: MambaConfig, ckpt: ModelWeights, **kwargs
) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        shapes = MambaLMHeadModel(target).state_dict()
    return select_weights(init, target, ckpt, shapes, **kwargs)


def refused(message: str):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def too_many_tokens(tokenizer: str, n_tokens: int) -> str:
    return (
        f"the tokenizer {tokenizer} has {n_tokens} tokens, more than the checkpoint's vocabulary of 64 rows: "
        "token ids past 63 have no embedding. Use the checkpoint's tokenizer (or one with at most that many "
        "tokens)"
    )


def test_a_tokenizer_as_large_as_the_vocabulary_fits_and_one_more_token_does_not() -> None:
    ckpt = checkpoint(UNTIED)
    assert sorted(select(InitFromConfig(path="ref"), UNTIED, ckpt, tokenizer="tok", n_tokens=64)) == sorted(
        ckpt.state_dict
    )
    with refused("init_from.path=ref: " + too_many_tokens("tok", 65)):
        select(InitFromConfig(path="ref"), UNTIED, ckpt, tokenizer="tok", n_tokens=65)


def test_the_head_alone_also_needs_every_token() -> None:
    # The embedding comes fresh, the head from the checkpoint: its 64 rows still score only 64 tokens.
    with refused("init_from.path=ref: " + too_many_tokens("tok", 65)):
        select(
            InitFromConfig(path="ref", embedding=False),
            UNTIED,
            checkpoint(UNTIED),
            tokenizer="tok",
            n_tokens=65,
        )
    # Neither taken: nothing of the checkpoint's vocabulary is used.
    weights = select(
        InitFromConfig(path="ref", embedding=False, lm_head=False), UNTIED, checkpoint(UNTIED), n_tokens=65
    )
    assert "backbone.embedding.weight" not in weights and "lm_head.weight" not in weights


def test_without_a_tokenizer_name_the_message_still_gives_the_count() -> None:
    with refused("init_from.path=ref: " + too_many_tokens("", 100)):
        select(InitFromConfig(path="ref"), UNTIED, checkpoint(UNTIED), n_tokens=100)


def test_every_problem_is_listed_in_one_message() -> None:
    three_blocks = MambaConfig(d_model=32, n_layer=3, vocab_size=64)
    with refused(
        "init_from.path=ref: the checkpoint has 2 blocks and model.n_layer=3: set model.n_layer=2, or choose "
        "blocks with init_from.num_layers / init_from.layers; " + too_many_tokens("tok", 65)
    ):
        select(InitFromConfig(path="ref"), three_blocks, checkpoint(UNTIED), tokenizer="tok", n_tokens=65)


def doctored(extra: bool, drop: str | None) -> ModelWeights:
    """UNTIED's checkpoint with, as a checkpoint of another code version may have, one tensor more in
    block 0 and one less."""
    ckpt = checkpoint(UNTIED)
    if extra:
        ckpt.state_dict["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    if drop:
        del ckpt.state_dict[drop]
    return ckpt


def test_a_tensor_only_the_checkpoint_has_is_named_alone() -> None:
    # Same settings on both sides: no "Fix:" part, and no separator after the one entry but the sentence's.
    with refused(
        NOT_FIT
        + "backbone.layers.0.mixer.extra: in the checkpoint (backbone.layers.0.mixer.extra) but not in this "
        "model; " + MUST
    ):
        select(InitFromConfig(path="ref"), UNTIED, doctored(extra=True, drop=None))


def test_a_tensor_only_the_model_has_is_named_alone() -> None:
    with refused(NOT_FIT + "backbone.layers.1.norm.weight: not in the checkpoint; " + MUST):
        select(
            InitFromConfig(path="ref"), UNTIED, doctored(extra=False, drop="backbone.layers.1.norm.weight")
        )


def test_tensors_only_one_side_has_are_all_listed() -> None:
    with refused(
        NOT_FIT
        + "backbone.layers.0.mixer.extra: in the checkpoint (backbone.layers.0.mixer.extra) but not in this "
        "model; backbone.layers.1.norm.weight: not in the checkpoint; " + MUST
    ):
        select(InitFromConfig(path="ref"), UNTIED, doctored(extra=True, drop="backbone.layers.1.norm.weight"))


HYBRID = MambaConfig(
    d_model=32,
    n_layer=2,
    vocab_size=64,
    attn_layer_idx=[1],
    attn=AttnConfig(num_heads=4),  # 4 key-value heads of 32 / 4 = 8
    ssm=SSMConfig(d_state=8),
)


@pytest.mark.parametrize(
    ("attn", "fix"),
    [
        (AttnConfig(num_heads=4, num_heads_kv=2), "model.attn.num_heads_kv=4"),
        (AttnConfig(num_heads=4, head_dim=16), "model.attn.head_dim=8"),
    ],
)
def test_the_key_value_heads_and_the_head_size_are_named_with_the_checkpoint_value(
    attn: AttnConfig, fix: str
) -> None:
    target = MambaConfig(**{**HYBRID.__dict__, "attn": attn})
    with pytest.raises(ValueError) as info:
        select(InitFromConfig(path="ref"), target, checkpoint(HYBRID))
    assert str(info.value).startswith(NOT_FIT + "backbone.layers.1.mixer.")
    assert str(info.value).endswith(f"{MUST} Fix: set {fix}.")
