"""Inheritune: growth keeps the trained blocks and their AdamW state; the loop runs for Mamba-1,
Mamba-2 and hybrid references and writes its table; bad depths fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import cli
from handover.init_from import inherited_config
from handover.mamba_ssm import export_mamba_ssm
from models.config import AttnConfig, MambaConfig, SSMConfig
from models.mamba_lm import MambaLMHeadModel
from recipes.inheritune import grown_state, load_optimizer_state_by_name, optimizer_state_by_name, run
from tests.conftest import tiny_overrides
from tests.test_train import ROOT

REFERENCES = {
    "mamba1": MambaConfig(d_model=32, n_layer=4, vocab_size=300, ssm=SSMConfig(d_state=8)),
    "mamba2": MambaConfig(
        d_model=32,
        n_layer=4,
        vocab_size=300,
        ssm=SSMConfig(layer="mamba2", d_state=8, headdim=16, chunk_size=8),
    ),
    "hybrid": MambaConfig(
        d_model=32,
        n_layer=4,
        vocab_size=300,
        d_intermediate=64,
        attn_layer_idx=[2],
        attn=AttnConfig(num_heads=4),
        ssm=SSMConfig(layer="mamba2", d_state=8, headdim=16, chunk_size=8),
    ),
}


def test_growth_keeps_old_blocks_and_their_adamw_state() -> None:
    ref = MambaLMHeadModel(REFERENCES["hybrid"])
    small = MambaLMHeadModel(inherited_config(ref.config, [0, 1]))
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-3)
    for _ in range(2):  # two steps: moments and step counts that differ from a fresh optimizer
        small(torch.randint(0, 300, (2, 9))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.clone() for k, v in small.state_dict().items()}
    states = optimizer_state_by_name(small, optimizer)

    grown_cfg = inherited_config(ref.config, [0, 1, 2])
    assert grown_cfg.attn_layer_idx == [2]  # the reference's block 2 is attention, and stays so
    grown = MambaLMHeadModel(grown_cfg)
    grown.load_state_dict(grown_state(trained, ref.state_dict(), 2, 3))
    grown_optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    copied = load_optimizer_state_by_name(grown, grown_optimizer, states)
    assert copied == len(list(small.parameters()))

    ref_sd = ref.state_dict()
    for name, param in grown.named_parameters():
        if name.startswith("backbone.layers.2."):
            assert torch.equal(param, ref_sd[name]), name  # the new block: the reference's, bit for bit
            assert param not in grown_optimizer.state  # fresh AdamW state, created at its first step
        else:
            assert torch.equal(param, trained[name]), name  # trained weights kept
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(grown_optimizer.state[param][key], states[name][key]), (name, key)
            assert float(grown_optimizer.state[param]["step"]) == 2.0


@pytest.mark.parametrize("kind", list(REFERENCES))
def test_inheritune_loop_grows_until_parity_or_the_limit(
    kind: str, corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    export_mamba_ssm(MambaLMHeadModel(REFERENCES[kind]), tmp_path / "ref")
    overrides = tiny_overrides(
        corpus,
        tmp_path,
        run_name="it",
        max_duration="2ba",
        **{"scheduler.t_warmup": "0ba", "scheduler.t_decay": "1ba", "checkpoint.save_interval": "2ba"},
    )
    # A random reference is easy to beat after two steps; to exercise every growth step, report
    # a reference loss no model reaches (the first evaluation is the reference's), so the loop
    # grows to the depth limit.
    import recipes.inheritune as inheritune

    real = inheritune.validation_loss
    calls = []

    def validation_loss(cfg, model):
        calls.append(cfg.run_name)
        loss = real(cfg, model)
        return -1.0 if len(calls) == 1 else loss

    monkeypatch.setattr(inheritune, "validation_loss", validation_loss)
    # The baselines (from scratch at the final depth) do not depend on the kind: run them once.
    baselines = kind == "mamba1"
    rounds = run(
        [str(ROOT / "yamls/tiny/wsd.yaml")], overrides, str(tmp_path / "ref"), grow_by=1, baselines=baselines
    )
    inherit = [r for r in rounds if r.name.isdigit()]
    assert [r.depth for r in inherit] == [2, 3, 4]  # half of the reference's 4 blocks, then +1 per round
    last = inherit[-1]
    assert [r.steps for r in inherit] == [2 * (i + 1) for i in range(len(inherit))]
    expected = [("scratch", last.depth, last.steps), ("scratch 2x", last.depth, 2 * last.steps)]
    assert [(r.name, r.depth, r.steps) for r in rounds if not r.name.isdigit()] == (
        expected if baselines else []
    )
    table = json.loads((tmp_path / "it" / "inheritune.json").read_text())
    assert [row["round"] for row in table["rounds"]] == [r.name for r in rounds]
    assert (
        "| round | depth | steps | validation loss | reference loss |"
        in (tmp_path / "it" / "inheritune.md").read_text()
    )


def test_bad_depths_fail_clearly(corpus: dict[str, Path], tmp_path: Path) -> None:
    export_mamba_ssm(MambaLMHeadModel(REFERENCES["mamba1"]), tmp_path / "ref")
    overrides = tiny_overrides(corpus, tmp_path, run_name="bad", max_duration="2ba")
    with pytest.raises(cli.UserError, match="--max-depth"):
        run([str(ROOT / "yamls/tiny/wsd.yaml")], overrides, str(tmp_path / "ref"), start_depth=5)
    with pytest.raises(cli.UserError, match="in batches"):
        run([str(ROOT / "yamls/tiny/wsd.yaml")], [*overrides, "max_duration=1ep"], str(tmp_path / "ref"))
