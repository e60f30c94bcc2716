"""The ablation recipes differ only in what they compare, on any number of GPUs.

Each recipe is resolved as a run would resolve it (``load_train_config``, then ``plan_schedule``:
the batch ramp quantised for the process count and the schedule's times converted with that
geometry), at 1, 8 and 64 processes, without training. Its learning rate is then evaluated step by
step, on the clock a run passes through, until the warmup ends, and compared with a hand
computation and with every other recipe of the set.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from composer.core import Time, Timestamp

from callbacks import registry
from recipes.config import TrainConfig, load_train_config, resolved_dict
from recipes.plan import _batch_problems, plan_schedule

YAMLS = Path(__file__).resolve().parents[1] / "yamls"
SCHEDULE_KEYS = ("scheduler.name", "scheduler.t_decay", "scheduler.decay_shape", "checkpoint.pre_decay")
# What each recipe may change against its WSD reference: the thing it compares (and its name).
COMPARES: dict[str, tuple[str, ...]] = {
    "wsd_posweight": ("algorithms.positional_weighting",),
    "cosine": SCHEDULE_KEYS,
    # D2Z decays to zero by design (its final lr is what it compares); alpha_i is Composer's own
    # argument, 1 = the peak, as WSD's.
    "d2z": (*SCHEDULE_KEYS, "scheduler.alpha_f", "scheduler.alpha_i"),
    "mamba2": ("model.",),
    "hybrid": ("model.",),
}
PAPER = {variant: f"ablation_{variant}.yaml" for variant in ("wsd", *COMPARES)}
TINY = {variant: f"tiny/{variant}.yaml" for variant in ("wsd", *COMPARES)}


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load(recipe: str) -> TrainConfig:
    return load_train_config([YAMLS / recipe])


@pytest.mark.parametrize("recipes", [PAPER, TINY], ids=["paper", "tiny"])
def test_each_recipe_differs_from_wsd_only_in_what_it_compares(recipes: dict[str, str]) -> None:
    reference = flat(resolved_dict(load(recipes["wsd"])))
    for variant, allowed in COMPARES.items():
        resolved = flat(resolved_dict(load(recipes[variant])))
        differing = {
            key
            for key in reference.keys() | resolved.keys()
            if reference.get(key, "<unset>") != resolved.get(key, "<unset>")
        }
        unexpected = {k for k in differing - {"run_name", "base"} if not k.startswith(allowed)}
        assert not unexpected, f"{recipes[variant]} also changes {sorted(unexpected)}"
        assert differing - {"run_name", "base"}, f"{recipes[variant]} compares nothing"


def test_the_long_document_pair_differs_only_in_the_weighting() -> None:
    """make posweight-tiny: yamls/tiny/long_wsd.yaml against long_wsd_posweight.yaml."""
    reference = flat(resolved_dict(load("tiny/long_wsd.yaml")))
    weighted = flat(resolved_dict(load("tiny/long_wsd_posweight.yaml")))
    differing = {
        k for k in reference.keys() | weighted.keys() if reference.get(k, "-") != weighted.get(k, "-")
    }
    assert {k.rsplit(".", 1)[0] if k.startswith("algorithms.") else k for k in differing} == {
        "base", "run_name", "algorithms.positional_weighting",
    }  # fmt: skip


def ramp_clock(world: int, steps: int) -> list[tuple[int, int, int]]:
    """(batch, sample, token) before each of ``steps`` optimizer steps of the paper's ablation.

    Written from the ramp's statement, independently of callbacks/batch_rampup.py: the global batch
    grows linearly in tokens from 262,144 to 2,097,152 (512 x 4096) over the first 1e9 tokens, in
    whole micro-batches of 4 x 4096 tokens on every one of ``world`` processes (rounded down, at
    least one): k(t) = max(1, floor(b(t) / unit)) micro-batches per process.
    """
    seq, unit = 4096, 4096 * 4 * world
    clock, samples = [], 0
    for batch in range(steps):
        tokens = samples * seq
        wanted = Fraction(262144) + Fraction(2097152 - 262144) * min(tokens, 10**9) / 10**9
        clock.append((batch, samples, tokens))
        samples += max(1, int(wanted // unit)) * 4 * world
    return clock


def tiny_clock(world: int, steps: int) -> list[tuple[int, int, int]]:
    """The tiny twins: a constant global batch of 16 samples of 256 tokens, whatever the world."""
    return [(n, 16 * n, 16 * n * 256) for n in range(steps)]


def lr_multipliers(
    cfg: TrainConfig, world: int, seq_len: int, clock: list[tuple[int, int, int]]
) -> list[float]:
    """The schedule a run of ``cfg`` on ``world`` processes follows, at each point of ``clock``."""
    plan = plan_schedule(cfg, world, seq_len)
    assert plan.problems == [] and _batch_problems(cfg, world) == [], (plan.problems, world)
    scheduler = registry.schedulers.build(plan.name, plan.args, where="scheduler")
    end = Time.from_timestring(cfg.max_duration)
    values = []
    for batch, sample, token in clock:
        state = SimpleNamespace(
            max_duration=end,
            timestamp=Timestamp(batch=batch, sample=sample, token=token),
            dataloader_len=None,
        )
        values.append(scheduler(state))
    return values


WARMUP_TOKENS = 503_316_480
PEAK = 2e-3


@pytest.mark.parametrize("world", [1, 8, 64])
def test_paper_ablations_warm_up_alike_on_any_number_of_gpus(world: int) -> None:
    clock = ramp_clock(world, 1200)
    # The warmup ends at the first step that starts at or after 503,316,480 tokens.
    end = next(n for n, (_, _, tokens) in enumerate(clock) if tokens >= WARMUP_TOKENS)
    expected = [PEAK * min(1.0, tokens / WARMUP_TOKENS) for _, _, tokens in clock[: end + 1]]
    if world == 64:
        # By hand: one 4 x 4096 micro-batch per GPU is 1,048,576 tokens, above the ramp's start, so
        # the batch stays 1M tokens for the first ~950 steps: the paper's 480 steps, lr = peak * n / 480.
        assert end == 480
        assert expected == pytest.approx([PEAK * n / 480 for n in range(481)], rel=1e-12, abs=0)
    else:
        assert end > 480  # smaller first batches: more steps to the same tokens (837 on 1 GPU, 940 on 8)
    for variant, recipe in PAPER.items():
        cfg = load(recipe)
        lrs = [cfg.optimizer.lr * m for m in lr_multipliers(cfg, world, 4096, clock[: end + 1])]
        assert lrs[:end] == pytest.approx(expected[:end], rel=1e-12, abs=1e-15), (
            f"{recipe} on {world} processes"
        )
        # The first step after the warmup: WSD holds the peak; cosine and D2Z decay from the warmup's
        # end, here x = (tokens - warmup) / (1e10 - warmup) into their decay (0 on 64 GPUs).
        x = (clock[end][2] - WARMUP_TOKENS) / (10**10 - WARMUP_TOKENS)
        after = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x)), "d2z": 1 - x}.get(variant, 1.0)
        assert lrs[end] == pytest.approx(PEAK * after, rel=1e-12), variant


@pytest.mark.parametrize("world", [1, 2])  # 16 samples in micro-batches of 8: at most 2 processes
def test_tiny_twins_warm_up_alike(world: int) -> None:
    clock = tiny_clock(world, 16)
    expected = [3e-3 * n / 15 for n in range(16)]  # 15 warmup batches to 3e-3, by hand
    for recipe in TINY.values():
        cfg = load(recipe)
        lrs = [cfg.optimizer.lr * m for m in lr_multipliers(cfg, world, 256, clock)]
        assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15), f"{recipe} on {world} processes"


def test_a_warmup_in_steps_would_differ_across_world_sizes() -> None:
    """Why the recipes write the warmup in tokens: 480 steps cover other tokens on 8 GPUs than on 64."""
    tokens_at_480 = {world: ramp_clock(world, 481)[480][2] for world in (8, 64)}
    assert tokens_at_480 == {8: 156_237_824, 64: WARMUP_TOKENS}
