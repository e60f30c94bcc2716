"""The shipped GPU recipes resolve to the FSDP mixed precision the README's "GPU precision" states.

The mode is read from the README's sentence, and what it means is asked of Composer itself
(``create_mixed_precision_policy``, what its FSDP2 wrapper applies), so a recipe, the config default
or the README drifting apart fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from composer.core import Precision
from composer.distributed.fsdp2 import create_mixed_precision_policy

import recipes.plan
from recipes.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPES = [*sorted(p.name for p in (ROOT / "yamls").glob("ablation_*.yaml")), "mambaoutai_1.6b.yaml"]


def readme_mode() -> str:
    section = (ROOT / "README.md").read_text().split("### GPU precision", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"runs Composer's `fsdp\.mixed_precision:\s+(\w+)`", section)
    assert match, "README's GPU precision section no longer names the mode it runs"
    return match.group(1)


def test_readme_states_bf16_compute_with_fp32_reductions() -> None:
    policy = create_mixed_precision_policy(Precision.AMP_BF16, readme_mode())
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipe_runs_what_the_readme_says(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_train_config([ROOT / "yamls" / recipe])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    precision = recipes.plan.resolve_precision(cfg)
    fsdp = cfg.fsdp.parallelism(world_size=8)["fsdp"]
    assert precision == "amp_bf16"
    assert fsdp["mixed_precision"] == readme_mode()
    policy = create_mixed_precision_policy(Precision(precision), fsdp["mixed_precision"])
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_cpu_runs_stay_fp32() -> None:
    """On CPU ``auto`` is fp32, and the same FSDP mode then casts nothing."""
    cfg = load_train_config([ROOT / "yamls" / "tiny" / "wsd.yaml"])
    precision = recipes.plan.resolve_precision(cfg)
    policy = create_mixed_precision_policy(
        Precision(precision), cfg.fsdp.parallelism(2)["fsdp"]["mixed_precision"]
    )
    assert precision == "fp32"
    assert {policy.param_dtype, policy.reduce_dtype} == {torch.float32}
