"""Recurrent generation (prefill + one step per token) against the full parallel forward."""

from __future__ import annotations

import pytest
import torch

from models.config import preset
from models.mamba_lm import MambaLMHeadModel


@pytest.mark.parametrize("name", ["debug", "debug-mamba2", "debug-hybrid"])
def test_step_logits_equal_full_forward(name: str) -> None:
    model = MambaLMHeadModel(preset(name)).eval()
    prompt = torch.randint(0, 500, (2, 7))
    steps = 64
    with torch.no_grad():
        out = model.generate(prompt, steps)  # greedy
        assert out.shape == (2, 7 + steps)
        assert torch.equal(out[:, :7], prompt)
        # Re-run the recurrence by hand to collect every step's logits.
        cache = model.allocate_inference_cache(2, 7 + steps)
        step_logits = [model(prompt, cache)[:, -1]]
        for t in range(7, 7 + steps - 1):
            step_logits.append(model(out[:, t : t + 1], cache)[:, -1])
        full = model(out[:, :-1])[:, 6:]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, rtol=1e-4, atol=1e-4)
    # Greedy decoding picks the argmax of the full forward at every position.
    assert torch.equal(out[:, 7:], full[..., : model.config.vocab_size].argmax(-1))


def test_vocab_size_limits_the_candidates_to_the_tokenizer() -> None:
    """A tokenizer smaller than the head: greedy picks the argmax of the first vocab_size logits only."""
    model = MambaLMHeadModel(preset("debug")).eval()
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, 8, vocab_size=50)
    with torch.no_grad():
        full = model(out[:, :-1])[:, 4:]
    assert int(out[:, 5:].max()) < 50
    assert torch.equal(out[:, 5:], full[..., :50].argmax(-1))
    assert not torch.equal(out, model.generate(prompt, 8))  # the unrestricted head picks other tokens


def test_sampling_is_reproducible_and_respects_top_k() -> None:
    model = MambaLMHeadModel(preset("debug")).eval()
    prompt = torch.randint(0, 500, (3, 4))
    a = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with torch.no_grad():
        logits = model(a[:, :-1])[:, 3:, : model.config.vocab_size]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, 4:, None]).any(-1).all()
    assert int(a.max()) < model.config.vocab_size


def test_eos_stops_a_sequence() -> None:
    model = MambaLMHeadModel(preset("debug")).eval()
    prompt = torch.randint(0, 500, (1, 4))
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 6])  # the third generated token becomes the end-of-text
    out = model.generate(prompt, 10, eos_token_id=eos)
    assert out.shape == greedy.shape
    first = int((out[0, 4:] == eos).nonzero()[0])
    assert (out[0, 4 + first :] == eos).all()
    assert torch.equal(out[0, : 4 + first + 1], greedy[0, : 4 + first + 1])


@pytest.mark.parametrize(
    "shape", [(0,), (5,), (1, 0), (0, 3), (1, 2, 3)], ids=["empty", "1-D", "empty-seq", "no-rows", "3-D"]
)
def test_bad_input_shapes_are_value_errors_naming_the_shape(shape: tuple[int, ...]) -> None:
    model = MambaLMHeadModel(preset("debug")).eval()
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        model(ids)
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        model.generate(ids, max_new_tokens=2)
