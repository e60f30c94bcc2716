"""Every shipped recipe starts: two batches of each, shrunk to a tiny model on the test corpus, with
the recipe's own schedule, units and features (batch ramp, loss-spike rollback, weighting) on.

Shrinking keeps what a recipe says and changes only sizes: the model's width and depth, the batch
(in samples; a ramp keeps its shape in micro-batches), the data (the test corpus, sequence 32).
``max_duration`` and every schedule time stay as written, so mixed units (a warmup in steps, a
duration in tokens) meet the same conversion as at full size. A decay recipe starts from a tiny
checkpoint of its own shape, as it would from a pre-decay checkpoint.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from composer.core import Time

from callbacks.batch_rampup import RampedBatches
from callbacks.jsonl_logger import read_jsonl
from callbacks.loss_spike import LossSpikeRollback
from callbacks.positional_weighting import PositionalLossWeighting
from callbacks.schedulers import decay_value
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.conftest import StopAfter, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    str(Path(p).relative_to(ROOT))
    for p in glob.glob(str(ROOT / "yamls" / "**" / "*.yaml"), recursive=True)
    if "/yamls/data/" not in p
)
BATCH, MICRO = 8, 4


def shrink(recipe: str, corpus: dict[str, Path], run_root: Path, **extra: object) -> list[str]:
    """Overrides that make ``recipe`` tiny without changing its schedule, units or features."""
    stated = load_train_config([ROOT / recipe])
    model = stated.model
    settings: dict[str, object] = {
        "model.d_model": 32,
        "model.n_layer": 2,
        "global_train_batch_size": BATCH,
        "device_train_microbatch_size": MICRO,
        "device_eval_batch_size": BATCH,
        "eval_subset_num_batches": 1,
    }
    if model.attn_layer_idx:
        settings.update(
            {"model.attn_layer_idx": "[1]", "model.attn.num_heads": 4, "model.attn.num_heads_kv": 2}
        )
        if model.attn.rotary_emb_dim:
            settings["model.attn.rotary_emb_dim"] = 8  # the whole head at d_model 32, 4 heads
    if model.d_intermediate:
        settings["model.d_intermediate"] = 64
    if model.ssm.layer == "mamba2":
        settings.update({"model.ssm.headdim": 16, "model.ssm.d_state": 16, "model.ssm.chunk_size": 16})
    if stated.batch_rampup is not None:
        # Two micro-batches per rank at the start, four (the target) after 2 batches' worth of tokens.
        settings["batch_rampup.start_batch_tokens"] = MICRO * 32
        settings["batch_rampup.ramp_tokens"] = 4 * BATCH * 32
    overrides = tiny_overrides(corpus, run_root, **settings, **extra)
    # tiny_overrides' max_duration, eval and save intervals are the test's; a recipe keeps its own.
    keep = ("max_duration=", "eval_interval=", "checkpoint.save_interval=", "model.ssm.d_state=")
    return [o for o in overrides if not o.startswith(keep)] + [
        f"{k}={v}" for k, v in settings.items() if k == "model.ssm.d_state"
    ]


def _tokens_before_each_batch(records: list[dict]) -> list[int]:
    """Tokens trained before each batch (Composer logs ``time/token`` at every batch start)."""
    return [int(r["time/token"]) for r in records if "time/token" in r]


def start(recipe: str, overrides: list[str], batches: int = 2):
    cfg = load_train_config([ROOT / recipe], overrides)
    trainer = build_trainer(prepare_run(cfg), extra_callbacks=[StopAfter(batches)])
    trainer.fit()
    state = trainer.state
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    trainer.close()
    return cfg, state, records


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_starts(recipe: str, corpus: dict[str, Path], tmp_path: Path) -> None:
    stated = load_train_config([ROOT / recipe])
    extra: dict[str, object] = {}
    if stated.init_from is not None or stated.scheduler["name"] == "decay_phase":
        # A tiny checkpoint of this recipe's own shape stands in for its pre-decay or released one.
        start(recipe, shrink(recipe, corpus, tmp_path, run_name="pre", init_from="null"))
        source = tmp_path / "pre" / "checkpoints" / "ep0-ba2-rank0.pt"
        extra["init_from.path" if stated.init_from is not None else "checkpoint.load_path"] = source
    cfg, state, records = start(recipe, shrink(recipe, corpus, tmp_path, **extra))
    assert int(state.timestamp.batch) == 2
    losses = [r["loss/train/total"] for r in records if "loss/train/total" in r]
    assert len(losses) == 2 and all(isinstance(v, float) and v == v for v in losses), losses

    # The recipe's features are on.
    algorithms = {type(a) for a in state.algorithms}
    assert (PositionalLossWeighting in algorithms) == ("positional_weighting" in cfg.parts("algorithms"))
    callbacks = {type(c) for c in state.callbacks}
    assert (LossSpikeRollback in callbacks) == ("loss_spike" in cfg.parts("callbacks"))
    assert isinstance(state.train_dataloader, RampedBatches) == (cfg.batch_rampup is not None)

    # The learning rate is the recipe's schedule, in the recipe's own units. LRMonitor logs f(n) at the
    # end of batch n (Composer evaluates the schedule before advancing the clock).
    lrs = [r["lr-AdamW/group0"] for r in records if "lr-AdamW/group0" in r]
    peak = cfg.optimizer.lr
    name = cfg.scheduler["name"]
    if cfg.init_from is not None:
        # Continuing or decaying a released model: the schedule starts at its peak and the re-warmup
        # scales it by (n + 1) / T at the end of batch n (handover/init_from.py).
        rewarmup = Time.from_timestring(cfg.init_from.lr_rewarmup)
        assert rewarmup.unit.value == "ba"
        schedule = [1.0, 1.0]  # wsd without warmup: the stable peak
        if name == "decay_phase":  # the recipe's decay shape from t_start 0 to max_duration
            end = Time.from_timestring(cfg.max_duration)
            done = {"ba": [0, 1], "tok": _tokens_before_each_batch(records)[:2]}[end.unit.value]
            shape, alpha_f = cfg.scheduler["decay_shape"], cfg.scheduler["alpha_f"]
            schedule = [decay_value(t / end.value, shape, alpha_f) for t in done]
        expected = [peak * f * (n + 1) / rewarmup.value for n, f in enumerate(schedule)]
        assert lrs == pytest.approx(expected, rel=1e-6), (recipe, lrs, expected)
    elif name == "decay_phase":
        assert lrs[0] == pytest.approx(peak)  # the stable lr, not the checkpoint's, and no jump
    else:
        warmup = Time.from_timestring(str(cfg.scheduler["t_warmup"]))
        if warmup.unit.value == "ba":
            expected = [peak * n / warmup.value for n in range(2)]
        else:  # in tokens (with a batch ramp): f at the tokens trained before each batch
            expected = [peak * min(1.0, t / warmup.value) for t in _tokens_before_each_batch(records)[:2]]
        assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12), (recipe, lrs, expected)
    assert torch.isfinite(torch.tensor(losses)).all()
