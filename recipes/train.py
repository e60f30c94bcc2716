"""Pre-train a Mamba language model with Composer.

    composer -n 8 recipes/train.py yamls/ablation_wsd.yaml key=value ...   # one node, 8 GPUs
    python recipes/train.py yamls/tiny/wsd.yaml max_duration=500ba         # one process (CPU or GPU)
    python recipes/train.py yamls/tiny/wsd.yaml --print-config             # the resolved config

Arguments ending in .yaml are recipes, merged in order (each after the recipes it extends with
``base:``); the others are ``key=value`` overrides of the typed config in recipes/config.py
(``model.*``: models/config.py, ``data.*``: data/loader.py). Registered parts are added by
name with their arguments: ``callbacks.memory_monitor={}``, ``loggers.wandb.project=mamba``.
The run writes to ``{run_root}/{run_name}``: ``run.json`` (resolved config, git revision,
package versions), ``metrics.jsonl``, and ``checkpoints/``, resumed automatically by the same
command after a crash (``checkpoint.autoresume``). The whole config is checked, and every
problem listed, before anything is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from composer import Evaluator, Trainer
from composer.core import Algorithm, Callback, Time, Timestamp, TimeUnit
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
from common.io import atomic_write_text, check_output_path
from common.threads import configure_threads
from data.loader import build_dataloader, check_data
from data.tokenizer import vocabulary_size
from handover.init_from import apply_init_from, source_record
from handover.integrity import (
    install_atomic_checkpoint_writes,
    recover_before_resume,
    remove_interrupted_writes,
    shape_problems,
)
from handover.reader import check_as_data, install_checkpoint_reads, release_pages_while_loading, verify
from models.composer_model import ComposerMambaLM, optimizer_param_groups
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig, load_train_config, resolved_dict
from recipes.units import CONVERTIBLE, Geometry, convert_schedule_times

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


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        return "amp_bf16" if torch.cuda.is_available() else "fp32"
    if cfg.precision == "amp_bf16" and not torch.cuda.is_available():
        raise ConfigError(
            "precision=amp_bf16 needs a GPU (bf16 matmuls are ~40x slower on CPU); use fp32 or auto"
        )
    return cfg.precision


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


def startup_report(cfg: TrainConfig) -> dict[str, Any]:
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
    return {
        "config": resolved_dict(cfg),
        "git_revision": revision + (" (dirty)" if dirty else ""),
        "versions": versions,
        "world_size": dist.get_world_size(),
        "argv": sys.argv,
    }


@dataclass
class Plan:
    """What the checks before a run found out: everything the build needs from the files on disk."""

    world: int
    device_batch: int  # samples per process per optimizer step
    precision: str
    seq_len: int
    scheduler_name: str
    scheduler_args: dict[str, Any]  # times converted to max_duration's unit
    notes: list[str] = field(default_factory=list)  # conversions and choices, printed at start-up


def _batch_problems(cfg: TrainConfig, world: int) -> list[str]:
    problems = []
    if cfg.global_train_batch_size % world:
        problems.append(
            f"global_train_batch_size={cfg.global_train_batch_size} is not divisible by the {world} processes"
        )
    elif (cfg.global_train_batch_size // world) % cfg.device_train_microbatch_size:
        problems.append(
            f"device_train_microbatch_size={cfg.device_train_microbatch_size} must divide the per-process batch "
            f"{cfg.global_train_batch_size // world} (global_train_batch_size / processes)"
        )
    return problems


def _vocab_problems(cfg: TrainConfig, tokenizer_vocab: int) -> list[str]:
    model = cfg.model
    if model.vocab_size < tokenizer_vocab:
        return [
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens "
            f"({cfg.tokenizer}): ids from {model.vocab_size} up would index past the embedding; remove "
            f"model.vocab_size from the recipe (it then follows the tokenizer) or set it to {tokenizer_vocab}"
        ]
    padded = -(-tokenizer_vocab // model.pad_vocab_size_multiple) * model.pad_vocab_size_multiple
    if model.padded_vocab_size > padded:
        warnings.warn(
            f"model.vocab_size={model.vocab_size} is larger than the tokenizer's {tokenizer_vocab} tokens: "
            f"{model.padded_vocab_size - tokenizer_vocab} embedding rows will never be used",
            stacklevel=3,
        )
    return []


def _schedule_problems(name: str, args: dict[str, Any], max_duration: str, geometry: Geometry) -> list[str]:
    """Evaluate the schedule at the start and the end of training, as Composer will, before any compute."""
    try:
        scheduler = registry.schedulers.build(name, args, where="scheduler")
        end = Time.from_timestring(max_duration)
        if end.unit not in CONVERTIBLE:
            return []  # epochs: resolved against the loader's length by Composer
        stamps = [Timestamp()]
        last = {unit: geometry.convert(end, unit).value for unit in CONVERTIBLE}
        stamps.append(
            Timestamp(batch=last[TimeUnit.BATCH], sample=last[TimeUnit.SAMPLE], token=last[TimeUnit.TOKEN])
        )
        for stamp in stamps:
            scheduler(SimpleNamespace(max_duration=end, timestamp=stamp, dataloader_len=None))
    except (ValueError, TypeError) as exc:
        return [f"scheduler ({name}): {exc}"]
    return []


def _checkpoint_to_load(cfg: TrainConfig, save_folder: str) -> tuple[str, str] | None:
    """(config key, local path) of the checkpoint the Trainer will load, if it is on local disk."""
    latest = Path(save_folder) / "latest-rank0.pt"
    if cfg.checkpoint.autoresume and not parse_uri(save_folder)[0] and latest.exists():
        return "the run's latest checkpoint", str(latest.resolve())
    path = cfg.checkpoint.load_path
    if path and not parse_uri(path)[0]:
        return "checkpoint.load_path", path
    return None


@dataclass
class SchedulePlan:
    """The learning-rate schedule on one run's geometry (``plan_schedule``)."""

    name: str
    args: dict[str, Any]  # times converted to max_duration's unit
    geometry: Geometry
    notes: list[str]
    problems: list[str]


def plan_schedule(cfg: TrainConfig, world: int, seq_len: int) -> SchedulePlan:
    """The schedule a run of ``cfg`` on ``world`` processes and ``seq_len``-token samples will follow.

    The batch ramp (if any) is quantised per process count, so the same recipe steps through
    different batch sizes on 8 and on 64 GPUs; its times are converted with that geometry and the
    schedule is evaluated at the start and the end of training. Reads no file: the checks before a
    run and the tests that compare recipes across world sizes share it.
    """
    name, args = cfg.scheduler_args()
    problems: list[str] = []
    ramp = None
    if cfg.batch_rampup is not None:
        try:
            ramp = cfg.batch_rampup.schedule(
                cfg.global_train_batch_size * seq_len, seq_len, cfg.device_train_microbatch_size, world
            )
        except ValueError as exc:
            problems.append(str(exc))
    geometry = Geometry(seq_len, cfg.global_train_batch_size, ramp)
    args, notes, unit_problems = convert_schedule_times(name, args, cfg.max_duration, geometry)
    schedule_problems = unit_problems or _schedule_problems(name, args, cfg.max_duration, geometry)
    return SchedulePlan(name, args, geometry, notes, problems + schedule_problems)


def plan_run(cfg: TrainConfig, world: int, save_folder: str) -> Plan:
    """Check everything that can be checked before the run writes or computes anything.

    The batch split over the processes, the precision, the tokenizer against the model's
    vocabulary, the data mixture's streams against the tokenizer, the schedule on the run's
    geometry (times converted to ``max_duration``'s unit), and the checkpoint to load against the
    model's shapes. Every problem found is reported at once in one ``ConfigError``.
    """
    problems = _batch_problems(cfg, world)
    try:
        check_output_path(cfg.run_dir, "the run folder (run_root/run_name)", overwrite=True)
    except cli.UserError as exc:
        problems.append(str(exc))
    precision = "fp32"
    try:
        precision = resolve_precision(cfg)
    except ConfigError as exc:
        problems += exc.problems
    seq_len, tokenizer_vocab = 0, None
    try:
        tokenizer_vocab = vocabulary_size(cfg.tokenizer)
        problems += _vocab_problems(cfg, tokenizer_vocab)
        # Each process checks its share of the local shard files; build_trainer shares the verdicts.
        part, parts = dist.get_local_rank(), dist.get_local_world_size()
        seq_len = check_data(cfg.data, cfg.tokenizer, "train", part, parts)
        if cfg.eval_interval:
            check_data(cfg.data, cfg.tokenizer, "val", part, parts)
    except ConfigError as exc:
        problems += exc.problems
    except (FileNotFoundError, ValueError) as exc:
        problems.append(str(exc))
    name, args = cfg.scheduler_args()
    notes: list[str] = []
    if seq_len:
        schedule = plan_schedule(cfg, world, seq_len)
        args, notes = schedule.args, schedule.notes
        problems += schedule.problems
    to_load = _checkpoint_to_load(cfg, save_folder)
    if to_load is not None:
        key, path = to_load
        verify(path, key)  # a corrupt file is a fault (exit 3), named before anything else
        own = key != "checkpoint.load_path"  # the run's autoresume: written by this run
        if not own and not cfg.checkpoint.trust:
            check_as_data(path, key, opt_in="checkpoint.trust=true")
        if not cfg.checkpoint.load_ignore_keys or not any(
            "model" in k for k in cfg.checkpoint.load_ignore_keys
        ):
            with torch.device("meta"):
                expected = {n: tuple(p.shape) for n, p in MambaLMHeadModel(cfg.model).state_dict().items()}
            problems += shape_problems(
                path, expected, key, trust=own or cfg.checkpoint.trust, opt_in="checkpoint.trust=true"
            )
    if problems:
        raise ConfigError(*problems)
    return Plan(world, cfg.global_train_batch_size // world, precision, seq_len, name, args, notes)


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    """The run's metrics file, then every registered logger the recipe names."""
    loggers: list[LoggerDestination] = [JSONLinesLogger(cfg.run_dir / "metrics.jsonl")]
    loggers += [registry.loggers.build(name, args) for name, args in cfg.parts("loggers").items()]
    if not cfg.logging.verbose:  # verbose: Composer's ConsoleLogger prints every metric instead
        loggers.append(ConsoleProgress(cfg.logging.progress_bar, cfg.logging.interval_batches))
    return loggers


def build_trainer(cfg: TrainConfig, extra_callbacks: list[Callback] | None = None) -> Trainer:
    # One process group for everything, before Streaming builds its shared memory (the Trainer
    # would create it only later, after the loaders).
    device = get_device("gpu" if torch.cuda.is_available() else "cpu")
    dist.initialize_dist(device)
    world = dist.get_world_size()
    ckpt = cfg.checkpoint
    save_folder = ckpt.save_folder or str(cfg.run_dir / "checkpoints")
    pre_decay_folder = ckpt.pre_decay_folder or _join(save_folder, "pre-decay")
    fault = None
    if ckpt.autoresume and dist.get_global_rank() == 0:
        # Before the checks: a broken or interrupted newest checkpoint is set aside, not reported
        # as a problem (nor met as "already exists" when the run writes that step again), and what
        # killed writes left in a local pre-decay folder is removed.
        pre_decay = format_name_with_dist(pre_decay_folder, cfg.run_name)
        fault = recover_before_resume(
            format_name_with_dist(save_folder, cfg.run_name), pre_decay if ckpt.pre_decay else None
        )
        if fault is None and not parse_uri(pre_decay)[0]:
            remove_interrupted_writes(pre_decay)
    # Rank 0's verdict reaches every rank (the other ranks wait here): all stop, or all go on.
    fault = broadcast_object(fault)
    if fault is not None:
        raise cli.RunStopped(fault)
    # Every check runs on every rank, and no rank goes on alone: the verdicts are shared before the
    # next collective, so a mistake found by any rank stops all of them with the same message.
    problems: list[str] = []
    try:
        plan = plan_run(cfg, world, save_folder)
        install_atomic_checkpoint_writes()
        # A remote checkpoint.load_path is downloaded by Composer and never checked here: read as data.
        install_checkpoint_reads(
            trust_unchecked=cfg.checkpoint.trust or not parse_uri(ckpt.load_path or "")[0]
        )
        if cfg.fsdp.parallelism(world) is not None:
            os.environ["FSDP_VERSION"] = str(cfg.fsdp.version)  # how Composer 0.32 picks FSDP1 or FSDP2
        reproducibility.seed_all(cfg.seed)
        model = build_model(cfg, fsdp=cfg.fsdp.parallelism(world) is not None)
        # Composer's load of a monolithic resume copies the memory-mapped checkpoint into this model:
        # each tensor's file pages are dropped once copied, so the load holds one copy, not two.
        release_pages_while_loading(model)
        # Weights from init_from, checked against the model, before anything is written; its callbacks
        # (the lr re-warmup) act after the schedule's own lr is set and before it is logged.
        handover_callbacks = apply_init_from(
            cfg.init_from,
            model,
            model_cfg=cfg.model,
            tokenizer=cfg.tokenizer,
            recipe=resolved_dict(cfg),
            data=cfg.data,
            fsdp_version=cfg.fsdp.version,
            fsdp_sharded=cfg.fsdp.parallelism(world) is not None,
            load_path=cfg.checkpoint.load_path,
        )
    except ConfigError as exc:
        problems = exc.problems
    except cli.USER_ERRORS as exc:
        problems = [str(exc) or type(exc).__name__]
    agreed = agree(device, problems)
    if agreed:
        raise ConfigError(*agreed)

    report = {**startup_report(cfg), **source_record(handover_callbacks)}
    if dist.get_global_rank() == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.run_dir / "run.json", json.dumps(report, indent=2, default=str) + "\n")
        print(f"[train] git {report['git_revision']}; versions {report['versions']}", flush=True)
        for note in plan.notes:
            print(f"[train] {note}", flush=True)
        print(f"[train] resolved config written to {cfg.run_dir / 'run.json'}", flush=True)

    # The guard first: it acts before the loss-spike rollback, and before every checkpoint saver.
    callbacks: list[Callback] = [
        NonFiniteGuard(),
        ScheduledLrAfterLoad(cfg.optimizer.lr),
        *handover_callbacks,
    ]
    callbacks += [
        registry.callbacks.build(n, a, run_dir=str(cfg.run_dir)) for n, a in cfg.parts("callbacks").items()
    ]
    if cfg.batch_rampup is not None:
        # The loader serves micro-batches; RampedBatches joins as many as the ramp asks for.
        train_spec = build_dataloader(
            cfg.data, cfg.tokenizer, cfg.device_train_microbatch_size, split="train"
        )
        schedule = cfg.batch_rampup.schedule(
            cfg.global_train_batch_size * plan.seq_len, plan.seq_len, cfg.device_train_microbatch_size, world
        )
        train_spec.dataloader = RampedBatches(train_spec.dataloader, schedule)
        callbacks.append(BatchRampup())
    else:
        train_spec = build_dataloader(cfg.data, cfg.tokenizer, plan.device_batch, split="train")
    evaluators = []
    if cfg.eval_interval:
        eval_spec = build_dataloader(cfg.data, cfg.tokenizer, cfg.device_eval_batch_size, split="val")
        evaluators.append(
            Evaluator(
                label="eval",
                dataloader=eval_spec,
                metric_names=METRIC_NAMES,
                subset_num_batches=cfg.eval_subset_num_batches,
            )
        )
    groups = [
        {k: v for k, v in g.items() if k != "names"}
        for g in optimizer_param_groups(model, cfg.optimizer.weight_decay)
    ]
    optimizer = cfg.optimizer.build(groups)
    scheduler = registry.schedulers.build(plan.scheduler_name, plan.scheduler_args, where="scheduler")

    # The gloo gradient fix runs first: clipping must see averaged gradients.
    algorithms: list[Algorithm] = [GlooFSDP2GradAverage()]
    algorithms += [registry.algorithms.build(n, a) for n, a in cfg.parts("algorithms").items()]

    if ckpt.pre_decay and isinstance(scheduler, WarmupStableDecayScheduler) and scheduler.t_decay is not None:
        callbacks.append(PreDecayCheckpoint(scheduler, pre_decay_folder))
    elif ckpt.pre_decay:
        warnings.warn(
            f"checkpoint.pre_decay is ignored: the {plan.scheduler_name} schedule has no stable phase; "
            "set checkpoint.pre_decay=false to silence this",
            stacklevel=2,
        )
    if failpoints.enabled():  # the fault-injection suite (tests/fault_injection.py)
        callbacks.append(failpoint_hooks.FailpointHooks())
    callbacks += extra_callbacks or []

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
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=cfg.fsdp.parallelism(world),
        save_folder=save_folder,
        save_interval=ckpt.save_interval,
        save_num_checkpoints_to_keep=ckpt.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=ckpt.autoresume,
        load_path=ckpt.load_path,
        load_weights_only=ckpt.load_weights_only,
        load_ignore_keys=list(ckpt.load_ignore_keys) or None,
        seed=cfg.seed,
        progress_bar=False,
        log_to_console=cfg.logging.verbose,
        console_log_interval=cfg.logging.console_interval,
    )
    trainer.logger.log_hyperparameters(report)  # the resolved config, revision and versions, in every logger
    return trainer


def is_complete(trainer: Trainer) -> bool:
    """Whether the run (resumed from its latest checkpoint) has already trained ``max_duration``."""
    state = trainer.state
    return state.max_duration is not None and state.timestamp >= state.max_duration


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or an object-store URI."""
    backend, bucket, path = parse_uri(folder)
    return f"{backend}://{bucket}/{path.rstrip('/')}/{name}" if backend else str(Path(folder) / name)


def parse_args(argv: Sequence[str] | None) -> tuple[list[str], list[str], bool]:
    """(recipes, overrides, print_config) from the command line."""
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
        "--verbose",
        action="store_true",
        help="print every metric every logging.console_interval (Composer's console) instead of a progress line",
    )
    parser.epilog = "registered parts (add them by name under their section):\n" + "\n".join(
        f"{key}:\n{reg.describe()}" for key, reg in registry.REGISTRIES.items()
    )
    args = parser.parse_args(argv)
    recipes = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a] + (["logging.verbose=true"] if args.verbose else [])
    if not recipes:
        parser.error("give at least one recipe, e.g. recipes/train.py yamls/tiny/wsd.yaml")
    return recipes, overrides, args.print_config


def main(argv: Sequence[str] | None = None) -> None:
    recipes, overrides, print_config = parse_args(argv)
    cfg = load_train_config(recipes, overrides)
    if print_config:
        print(OmegaConf.to_yaml(resolved_dict(cfg)), end="")
        return
    print(f"[train] {configure_threads(cfg.threads)}", flush=True)
    trainer = build_trainer(cfg)
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
