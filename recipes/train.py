"""Pre-train a Mamba language model with Composer.

    composer -n 8 recipes/train.py yamls/ablation_wsd.yaml key=value ...   # one node, 8 GPUs
    python recipes/train.py yamls/tiny/wsd.yaml max_duration=500ba         # one process (CPU or GPU)
    python recipes/train.py yamls/tiny/wsd.yaml --print-config             # the resolved config
    python recipes/train.py yamls/tiny/wsd.yaml --print-plan               # what the run would do

Arguments ending in .yaml are recipes, merged in order (each after the recipes it extends with
``base:``); the others are ``key=value`` overrides of the typed config in recipes/config.py
(``model.*``: models/config.py, ``data.*``: data/loader.py). Registered parts are added by
name with their arguments: ``callbacks.memory_monitor={}``, ``loggers.wandb.project=mamba``.
The run writes to ``{run_root}/{run_name}``: ``run.json`` (resolved config, git revision,
package versions), ``metrics.jsonl``, and ``checkpoints/``, resumed automatically by the same
command after a crash (``checkpoint.autoresume``). The run is planned first (recipes/plan.py: every
input read and checked once, every problem listed, on every rank, before anything is written), then
built from the plan (``build_trainer``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from composer import Evaluator, Trainer
from composer.callbacks import CheckpointSaver
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.utils import dist, format_name_with_dist, get_device, parse_uri, reproducibility
from omegaconf import OmegaConf

from callbacks import failpoint_hooks, registry
from callbacks.batch_rampup import BatchRampup, RampedBatches
from callbacks.console_progress import ConsoleProgress
from callbacks.gloo_grad_average import GlooFSDP2GradAverage
from callbacks.jsonl_logger import JSONLinesLogger
from callbacks.nonfinite_guard import NonFiniteGuard
from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
from callbacks.scheduled_lr import ScheduledLrAfterLoad
from callbacks.schedulers import WarmupStableDecayScheduler
from common import cli, failpoints
from common.config import ConfigError
from common.distributed import agree, broadcast_object
from common.io import atomic_write_text
from common.threads import configure_threads
from data.loader import build_split_loader
from handover.init_from import apply_init_from
from handover.integrity import (
    install_atomic_checkpoint_writes,
    recover_before_resume,
    remove_interrupted_writes,
)
from handover.reader import install_checkpoint_reads, release_pages_while_loading
from handover.record import HandoverRecord
from handover.training_state import TrainingRecord
from models.composer_model import ComposerMambaLM, optimizer_param_groups
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig, load_train_config, resolved_dict
from recipes.plan import RunPlan, join_folder, plan_run

METRIC_NAMES = ["LanguageCrossEntropy", "LanguagePerplexity", "Top1Accuracy", "Top3Accuracy", "Top10Accuracy"]
VERSIONED = (
    "torch",
    "mosaicml",
    "mosaicml-streaming",
    "transformers",
    "tokenizers",
    "mamba-ssm",
    "causal-conv1d",
)


def build_model(cfg: TrainConfig, fsdp: bool) -> ComposerMambaLM:
    """On GPU under FSDP (``fsdp``) the network is built on the meta device; Composer materialises
    each shard and initialises it with ``MambaLMHeadModel.param_init_fn``. The metrics stay real
    tensors: Composer moves them to the device itself, and cannot copy out of meta ones."""
    if fsdp and torch.cuda.is_available():
        with torch.device("meta"):
            network = MambaLMHeadModel(cfg.model)
    else:
        network = MambaLMHeadModel(cfg.model)
    return ComposerMambaLM(
        cfg.model, network, reset_state_at_doc_boundaries=cfg.reset_state_at_doc_boundaries
    )


def startup_report(plan: RunPlan) -> dict[str, Any]:
    """The resolved config, the git revision and package versions: logged and saved with the run."""
    here = Path(__file__).parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=here)
        dirty = bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = "unknown (not a git checkout)", False
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    report = {
        "config": plan.resolved,
        "git_revision": revision + (" (dirty)" if dirty else ""),
        "versions": versions,
        "world_size": plan.geometry.world_size,
        "argv": sys.argv,
    }
    if plan.init_from is not None:
        report["init_from_source"] = plan.init_from.record
    if plan.load is not None and plan.load.source is not None:
        report["load_path_source"] = plan.load.source
    return report


def prepare_run(cfg: TrainConfig, recover: bool = True) -> RunPlan:
    """Start the process group, then plan the run on every rank and share the verdict.

    One process group for everything, before Streaming builds its shared memory (the Trainer would
    create it only later, after the loaders). With ``recover`` (a run, not ``--print-plan``), rank 0
    first sets aside a broken or interrupted newest checkpoint of an autoresumed run. Every rank
    then plans (``plan_run``), and no rank goes on alone: a mistake found by any rank stops all of
    them with the same message, before the next collective.
    """
    device = get_device("gpu" if torch.cuda.is_available() else "cpu")
    dist.initialize_dist(device)
    ckpt = cfg.checkpoint
    fault = None
    if recover and ckpt.autoresume and dist.get_global_rank() == 0:
        # Before the checks: a broken or interrupted newest checkpoint is set aside, not reported
        # as a problem (nor met as "already exists" when the run writes that step again), and what
        # killed writes left in a local pre-decay folder is removed.
        save_folder = ckpt.save_folder or str(cfg.run_dir / "checkpoints")
        pre_decay = format_name_with_dist(
            ckpt.pre_decay_folder or join_folder(save_folder, "pre-decay"), cfg.run_name
        )
        fault = recover_before_resume(
            format_name_with_dist(save_folder, cfg.run_name), pre_decay if ckpt.pre_decay else None
        )
        if fault is None and not parse_uri(pre_decay)[0]:
            remove_interrupted_writes(pre_decay)
    # Rank 0's verdict reaches every rank (the other ranks wait here): all stop, or all go on.
    fault = broadcast_object(fault)
    if fault is not None:
        raise cli.RunStopped(fault)
    problems: list[str] = []
    plan = None
    try:
        # Each process checks its share of the local shard files.
        plan = plan_run(cfg, dist.get_world_size(), dist.get_local_rank(), dist.get_local_world_size())
    except ConfigError as exc:
        problems = exc.problems
    except cli.USER_ERRORS as exc:
        problems = [str(exc) or type(exc).__name__]
    agreed = agree(device, problems)
    if agreed:
        raise ConfigError(*agreed)
    assert plan is not None
    return plan


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    """The run's metrics file, then every registered logger the recipe names."""
    loggers: list[LoggerDestination] = [JSONLinesLogger(cfg.run_dir / "metrics.jsonl")]
    loggers += [registry.loggers.build(name, args) for name, args in cfg.parts("loggers").items()]
    if not cfg.logging.verbose:  # verbose: Composer's ConsoleLogger prints every metric instead
        loggers.append(ConsoleProgress(cfg.logging.progress_bar, cfg.logging.interval_batches))
    return loggers


def build_trainer(plan: RunPlan, extra_callbacks: list[Callback] | None = None) -> Trainer:
    """The Composer Trainer of a planned run: builds only, from the plan (reads none of its inputs again).

    Writes ``run.json`` (rank 0), then builds the model (with the ``init_from`` weights), the
    loaders, the optimizer, the schedule, the callbacks and the loggers, in that order.
    """
    cfg, geometry, ckpt = plan.cfg, plan.geometry, plan.cfg.checkpoint
    install_atomic_checkpoint_writes()
    # A remote checkpoint.load_path is downloaded by Composer and never checked here: read as data.
    install_checkpoint_reads(trust_unchecked=cfg.checkpoint.trust or not parse_uri(ckpt.load_path or "")[0])
    if plan.parallelism is not None:
        os.environ["FSDP_VERSION"] = str(cfg.fsdp.version)  # how Composer 0.32 picks FSDP1 or FSDP2
    reproducibility.seed_all(cfg.seed)
    model = build_model(cfg, fsdp=plan.parallelism is not None)
    # Composer's load of a monolithic resume copies the memory-mapped checkpoint into this model:
    # each tensor's file pages are dropped once copied, so the load holds one copy, not two.
    release_pages_while_loading(model)
    # Under FSDP2 the init_from weights are copied per rank after sharding (LoadShards, returned).
    loading = apply_init_from(plan.init_from, model, cfg.fsdp.version) if plan.init_from is not None else []

    report = startup_report(plan)
    if dist.get_global_rank() == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.run_dir / "run.json", json.dumps(report, indent=2, default=str) + "\n")
        if cfg.logging.verbose:
            print(f"[train] git {report['git_revision']}; versions {report['versions']}", flush=True)
        for line in plan.describe():
            print(f"[train] {line}", flush=True)
        print(f"[train] resolved config, git revision and versions in {cfg.run_dir / 'run.json'}", flush=True)

    # The guard first: it acts before the loss-spike rollback, and before every checkpoint saver. The
    # init_from callbacks (the lr re-warmup) act after the schedule's own lr is set and before it is logged.
    callbacks: list[Callback] = [
        NonFiniteGuard(),
        ScheduledLrAfterLoad(cfg.optimizer.lr),
        # The model config and the resolved recipe in every checkpoint: what an export needs to know.
        HandoverRecord(cfg.model, cfg.tokenizer, plan.tokenizer.special_token_ids),
        TrainingRecord(plan.resolved),
        *(plan.init_from.callbacks if plan.init_from is not None else ()),
        *loading,
    ]
    callbacks += [
        registry.callbacks.build(n, a, run_dir=str(cfg.run_dir)) for n, a in cfg.parts("callbacks").items()
    ]
    if geometry.ramp is not None:
        # The loader serves micro-batches; RampedBatches joins as many as the ramp asks for.
        train_spec = build_split_loader(cfg.data, plan.data.train, geometry.micro_batch)
        train_spec.dataloader = RampedBatches(train_spec.dataloader, geometry.ramp)
        callbacks.append(BatchRampup())
    else:
        train_spec = build_split_loader(cfg.data, plan.data.train, geometry.device_batch)
    evaluators = []
    if plan.data.val is not None:
        evaluators.append(
            Evaluator(
                label="eval",
                dataloader=build_split_loader(cfg.data, plan.data.val, cfg.device_eval_batch_size),
                metric_names=METRIC_NAMES,
                subset_num_batches=cfg.eval_subset_num_batches,
            )
        )
    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in optimizer_param_groups(model, cfg.optimizer.weight_decay)
    ]
    optimizer = cfg.optimizer.build(groups)
    scheduler = registry.schedulers.build(plan.schedule.name, plan.schedule.args, where="scheduler")

    # The gloo gradient fix runs first: clipping must see averaged gradients.
    algorithms: list[Algorithm] = [GlooFSDP2GradAverage()]
    algorithms += [registry.algorithms.build(n, a) for n, a in cfg.parts("algorithms").items()]

    if ckpt.pre_decay and isinstance(scheduler, WarmupStableDecayScheduler) and scheduler.t_decay is not None:
        callbacks.append(PreDecayCheckpoint(scheduler, plan.pre_decay_folder))
    elif ckpt.pre_decay:
        warnings.warn(
            f"checkpoint.pre_decay is ignored: the {plan.schedule.name} schedule has no stable phase; "
            "set checkpoint.pre_decay=false to silence this",
            stacklevel=2,
        )
    if failpoints.enabled():  # the fault-injection suite (tests/fault_injection.py)
        callbacks.append(failpoint_hooks.FailpointHooks())
    callbacks += extra_callbacks or []

    ignore_keys = list(plan.load.ignore_keys) if plan.load is not None and not plan.load.own else []
    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval or 1,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=build_loggers(cfg),
        device="gpu" if torch.cuda.is_available() else "cpu",
        precision=plan.precision,
        device_train_microbatch_size=geometry.micro_batch,
        parallelism_config=plan.parallelism,
        save_folder=plan.save_folder,
        save_interval=ckpt.save_interval,
        save_num_checkpoints_to_keep=ckpt.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=ckpt.autoresume,
        load_path=ckpt.load_path,
        load_weights_only=ckpt.load_weights_only,
        load_ignore_keys=ignore_keys or None,
        seed=cfg.seed,
        progress_bar=False,
        log_to_console=cfg.logging.verbose,
        console_log_interval=cfg.logging.console_interval,
    )
    trainer.logger.log_hyperparameters(report)  # the resolved config, revision and versions, in every logger
    set_remote_poll(trainer, ckpt.remote_poll_seconds)
    return trainer


def set_remote_poll(trainer: Trainer, seconds: float) -> None:
    """Every checkpoint saver of ``trainer`` (its own, the pre-decay one) checks for a checkpoint's
    files on an object store every ``seconds`` before writing the ``latest`` link.

    Composer 0.32 keeps this interval in a private attribute that its own tests set; a Composer
    without it would silently keep 30 s, so that is an error naming the pin."""
    savers = [cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)]
    savers += [cb.saver for cb in trainer.state.callbacks if isinstance(cb, PreDecayCheckpoint)]
    for saver in savers:
        if not hasattr(saver, REMOTE_POLL_ATTRIBUTE):
            raise RuntimeError(
                f"composer {importlib.metadata.version('mosaicml')}'s CheckpointSaver has no "
                f"{REMOTE_POLL_ATTRIBUTE}: checkpoint.remote_poll_seconds needs the pinned mosaicml "
                "(requirements.txt)"
            )
        setattr(saver, REMOTE_POLL_ATTRIBUTE, float(seconds))


REMOTE_POLL_ATTRIBUTE = "_symlink_upload_wait_before_next_try_in_seconds"


def is_complete(trainer: Trainer) -> bool:
    """Whether the run (resumed from its latest checkpoint) has already trained ``max_duration``."""
    state = trainer.state
    return state.max_duration is not None and state.timestamp >= state.max_duration


def parse_args(argv: Sequence[str] | None) -> tuple[list[str], list[str], str | None]:
    """(recipes, overrides, what to print instead of training: "config", "plan" or None)."""
    parser = cli.parser("recipes/train.py", __doc__)
    parser.add_argument(
        "args",
        nargs="*",
        metavar="RECIPE.yaml | key=value",
        help="recipes (merged in order) and key=value overrides of the config (recipes/config.py)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key, with defaults) and exit",
    )
    parser.add_argument(
        "--print-plan",
        action="store_true",
        help="plan the run (read and check the tokenizer, data and checkpoints), print the plan and exit; "
        "writes nothing",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print every metric every logging.console_interval (Composer's console) instead of a progress line",
    )
    parser.epilog = "registered parts (add them by name under their section):\n" + "\n".join(
        f"{key}:\n{reg.describe()}" for key, reg in registry.REGISTRIES.items()
    )
    args = parser.parse_intermixed_args(argv)
    recipes = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a] + (["logging.verbose=true"] if args.verbose else [])
    if not recipes:
        parser.error("give at least one recipe, e.g. recipes/train.py yamls/tiny/wsd.yaml")
    return recipes, overrides, "config" if args.print_config else "plan" if args.print_plan else None


def main(argv: Sequence[str] | None = None) -> None:
    recipes, overrides, show = parse_args(argv)
    cfg = load_train_config(recipes, overrides)
    if show == "config":
        print(OmegaConf.to_yaml(resolved_dict(cfg)), end="")
        return
    print(f"[train] {configure_threads(cfg.threads)}", flush=True)
    plan = prepare_run(cfg, recover=show != "plan")
    if show == "plan":
        if dist.get_global_rank() == 0:
            print("\n".join(plan.describe()), flush=True)
        return
    trainer = build_trainer(plan)
    # The plan refuses a loaded checkpoint past max_duration; a finished run started again resumes
    # from its own latest checkpoint and has nothing left to do.
    if is_complete(trainer):
        print(
            f"[train] {cfg.run_dir} is already complete ({trainer.state.timestamp.batch} of max_duration "
            f"{cfg.max_duration}); nothing to do. Train longer with a larger max_duration.",
            flush=True,
        )
    else:
        trainer.fit()
    trainer.close()


if __name__ == "__main__":
    cli.run(main)
