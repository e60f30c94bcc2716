"""Inheritune (Sanyal et al. 2024, "Inheritune: Training Smaller Yet More Attentive Language Models", Algorithm 1): inherit, train, grow.

    python -m recipes.inheritune yamls/tiny/inheritune.yaml --reference runs/inheritune/reference

1. Inherit: a model made of the reference's first n blocks (default n = half its depth), with
   its embedding, final norm and head (``init_from.num_layers``; handover/init_from.py).
2. Train it for T steps (the recipe's ``max_duration``; its schedule runs once per round).
3. Evaluate on the validation split against the reference's validation loss; while it is
   worse and the depth limit is not reached, grow: append the reference's next k blocks
   (``--grow-by``), keep every trained tensor *and its AdamW state* (moments and step count),
   give the new blocks fresh AdamW state, and train T more steps.

``--baselines`` adds the paper's comparison: a model of the final depth trained from scratch
for the same total number of steps, and one for twice as many. The table (round, depth,
steps, validation loss, reference loss) is printed and written as ``inheritune.md`` and
``inheritune.json`` in ``{run_root}/{run_name}``; each round is a run folder beside them.

The recipe is an ordinary training recipe (data, optimizer, schedule, batch); its ``model``
section is replaced by the reference's architecture at each depth. Works for Mamba-1, Mamba-2
and hybrid references (attention layers keep their type as blocks are inherited). Rounds run
in one process (growing moves optimizer state in memory; one GPU or the CPU).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common import cli
from common.io import atomic_write_text, check_output_path
from handover.init_from import InitFromConfig, LrRewarmup, inherited_config, parse_rewarmup
from handover.weights import read_weights
from models.config import MambaConfig
from recipes.config import TrainConfig, load_train_config

REWARMUP_DEFAULT = InitFromConfig.__dataclass_fields__["lr_rewarmup"].default


@dataclass
class Round:
    name: str  # "1", "2", ... or a baseline's name
    depth: int
    steps: int  # optimizer steps so far for this model
    val_loss: float
    reference_loss: float

    def row(self) -> dict[str, Any]:
        return {
            "round": self.name,
            "depth": self.depth,
            "steps": self.steps,
            "validation loss": round(self.val_loss, 4),
            "reference loss": round(self.reference_loss, 4),
        }


def grown_state(
    trained: dict[str, Tensor], reference: dict[str, Tensor], old_depth: int, new_depth: int
) -> dict[str, Tensor]:
    """The grown model's weights: every trained tensor, plus reference blocks old_depth..new_depth-1."""
    grown = dict(trained)
    for i in range(old_depth, new_depth):
        prefix = f"backbone.layers.{i}."
        grown.update({k: v for k, v in reference.items() if k.startswith(prefix)})
    return grown


def optimizer_state_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, Tensor]]:
    """AdamW's per-parameter state (moments, step), keyed by parameter name."""
    return {
        name: {k: v.detach().clone() for k, v in optimizer.state[p].items()}
        for name, p in model.named_parameters()
        if p in optimizer.state
    }


def load_optimizer_state_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict[str, dict[str, Tensor]]
) -> int:
    """Give every parameter of ``model`` named in ``states`` that state; returns how many.

    The grown model's new blocks are not in ``states``: AdamW creates their state at their first
    step, as in a fresh run.
    """
    copied = 0
    for name, param in model.named_parameters():
        if name not in states:
            continue
        exp_avg = states[name].get("exp_avg")
        if exp_avg is not None and exp_avg.shape != param.shape:
            raise ValueError(
                f"growing kept {name} but its shape changed: {tuple(exp_avg.shape)} -> {tuple(param.shape)}"
            )
        optimizer.state[param] = {k: v.clone() for k, v in states[name].items()}
        copied += 1
    return copied


def _round_config(base: TrainConfig, name: str, model: MambaConfig, steps: int, root: Path) -> TrainConfig:
    return replace(
        base,
        run_root=str(root),
        run_name=name,
        model=model,
        max_duration=f"{steps}ba",
        eval_interval=None,  # each round is evaluated here, after its trainer is closed
        init_from=None,
        checkpoint=replace(base.checkpoint, autoresume=False, load_path=None, pre_decay=False),
    )


def validation_loss(cfg: TrainConfig, model: torch.nn.Module) -> float:
    """Cross-entropy on the validation split (``eval_subset_num_batches`` batches; -1 = all)."""
    from data.loader import build_dataloader
    from recipes.evaluate import evaluate

    subset = cfg.eval_subset_num_batches if cfg.eval_subset_num_batches > 0 else None
    was_training = model.training
    spec = build_dataloader(cfg.data, cfg.tokenizer, cfg.device_eval_batch_size, split="val")
    result = evaluate(model, spec.dataloader, max_batches=subset, progress=False)
    model.train(was_training)
    return result["metrics"]["all"]["cross_entropy"]


def _train(
    cfg: TrainConfig,
    weights: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, dict[str, Tensor]] | None = None,
    lr_rewarmup: str = "0ba",
) -> tuple[torch.nn.Module, dict[str, dict[str, Tensor]]]:
    """One round: build the trainer, load ``weights`` and the kept AdamW state, train, close.

    Returns the trained model and its AdamW state by parameter name. The trainer is closed
    before the next is built: two live Streaming datasets over the same shards would share memory.
    """
    from recipes.train import build_trainer, prepare_run

    trainer = build_trainer(prepare_run(cfg))
    model = trainer.state.model.model
    if weights is not None:
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
        assert not unexpected and set(missing) <= tied, (missing, unexpected)
        # The new blocks start with fresh AdamW moments: re-warm as any init_from run, first in the
        # callbacks so that LRMonitor logs the lr in use.
        trainer.state.callbacks.insert(0, LrRewarmup(lr_rewarmup))
    if optimizer_state:
        load_optimizer_state_by_name(model, trainer.state.optimizers[0], optimizer_state)
    trainer.fit()
    state = optimizer_state_by_name(model, trainer.state.optimizers[0])
    trainer.close()
    return model, state


def run(
    recipe: Sequence[str],
    overrides: Sequence[str],
    reference: str,
    start_depth: int = 0,
    grow_by: int = 1,
    max_depth: int = 0,
    baselines: bool = False,
    lr_rewarmup: str = REWARMUP_DEFAULT,
) -> list[Round]:
    base = load_train_config(list(recipe), list(overrides))
    out = base.run_dir
    # Everything checked before anything is written: the flags, T, the output folder, the reference.
    try:
        parse_rewarmup(lr_rewarmup)
    except ValueError as exc:
        raise cli.UserError(f"--lr-rewarmup: {exc}") from exc
    steps_per_round = _steps(base.max_duration)
    check_output_path(out, "the run folder (run_root/run_name)", overwrite=True)
    ref = read_weights(reference)
    k = ref.config.n_layer
    depth = start_depth or math.ceil(k / 2)
    limit = max_depth or k
    if not 0 < depth <= limit <= k or grow_by < 1:
        raise cli.UserError(
            f"need 0 < --start-depth ({depth}) <= --max-depth ({limit}) <= the reference's {k} blocks and "
            f"--grow-by ({grow_by}) >= 1"
        )
    out.mkdir(parents=True, exist_ok=True)
    ref_cfg = replace(base, model=ref.config)
    ref_loss = validation_loss(ref_cfg, ref.build())
    print(f"[inheritune] reference {reference}: {k} blocks, validation loss {ref_loss:.4f}", flush=True)

    rounds: list[Round] = []
    total = 0
    cfg = _round_config(
        base, "round1", inherited_config(ref.config, list(range(depth))), steps_per_round, out
    )
    cfg = replace(cfg, init_from=InitFromConfig(path=reference, num_layers=depth, lr_rewarmup=lr_rewarmup))
    model, optimizer_state = _train(cfg)
    while True:
        total += steps_per_round
        loss = validation_loss(cfg, model)
        rounds.append(Round(str(len(rounds) + 1), depth, total, loss, ref_loss))
        print(
            f"[inheritune] round {len(rounds)}: depth {depth}, {total} steps, validation loss {loss:.4f}",
            flush=True,
        )
        _write_table(out, rounds, reference)
        if loss <= ref_loss or depth >= limit:
            break
        new_depth = min(depth + grow_by, limit)
        trained = {n: t.detach().clone() for n, t in model.state_dict().items()}
        weights = grown_state(trained, ref.state_dict, depth, new_depth)
        name = f"round{len(rounds) + 1}"
        cfg = _round_config(
            base, name, inherited_config(ref.config, list(range(new_depth))), steps_per_round, out
        )
        model, optimizer_state = _train(cfg, weights, optimizer_state, lr_rewarmup)
        depth = new_depth
    final_model = cfg.model
    if baselines:
        for name, steps in (("scratch", total), ("scratch 2x", 2 * total)):
            scfg = _round_config(base, name.replace(" ", "-"), final_model, steps, out)
            scratch_model, _ = _train(scfg)
            loss = validation_loss(scfg, scratch_model)
            rounds.append(Round(name, final_model.n_layer, steps, loss, ref_loss))
            print(
                f"[inheritune] {name}: depth {final_model.n_layer}, {steps} steps, loss {loss:.4f}",
                flush=True,
            )
            _write_table(out, rounds, reference)
    print(markdown_table(rounds))
    return rounds


def _steps(max_duration: str) -> int:
    if not max_duration.endswith("ba") or not max_duration[:-2].isdigit():
        raise cli.UserError(
            f"max_duration={max_duration!r}: Inheritune's T (steps per round) must be in batches, e.g. 100ba"
        )
    return int(max_duration[:-2])


def markdown_table(rounds: list[Round]) -> str:
    rows = [r.row() for r in rounds]
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def _write_table(out: Path, rounds: list[Round], reference: str) -> None:
    atomic_write_text(out / "inheritune.md", f"Inheritune from {reference}\n\n{markdown_table(rounds)}\n")
    atomic_write_text(
        out / "inheritune.json",
        json.dumps({"reference": reference, "rounds": [r.row() for r in rounds]}, indent=2) + "\n",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m recipes.inheritune", __doc__)
    parser.add_argument(
        "recipe", nargs="+", help="training recipe YAML(s) and key=value overrides (T = max_duration)"
    )
    parser.add_argument(
        "--reference", required=True, help="the reference model: run folder, checkpoint, HF or mamba_ssm dir"
    )
    parser.add_argument(
        "--start-depth", type=int, default=0, help="blocks inherited first (0 = half the reference's)"
    )
    parser.add_argument("--grow-by", type=int, default=1, help="blocks added per round (the paper: 2 of 36)")
    parser.add_argument(
        "--max-depth", type=int, default=0, help="stop growing at this depth (0 = the reference's)"
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also train the final depth from scratch for the same and twice the steps",
    )
    parser.add_argument(
        "--lr-rewarmup",
        default=REWARMUP_DEFAULT,
        help="lr ramp while fresh AdamW moments fill (init_from.lr_rewarmup)",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may follow the flags too
    yamls = [a for a in args.recipe if "=" not in a]
    overrides = [a for a in args.recipe if "=" in a]
    if not yamls:
        raise cli.UserError("give a training recipe YAML (e.g. yamls/tiny/inheritune.yaml)")
    run(
        yamls,
        overrides,
        args.reference,
        args.start_depth,
        args.grow_by,
        args.max_depth,
        args.baselines,
        args.lr_rewarmup,
    )


if __name__ == "__main__":
    cli.run(main)
