"""Pre-train a Mamba language model with Composer.

    composer -n 8 recipes/train.py yamls/ablation_wsd.yaml key=value ...   # one node, 8 GPUs
    python recipes/train.py yamls/tiny/wsd.yaml                             # one process (CPU or GPU)

Arguments ending in .yaml are recipes, merged in order; the others are ``key=value``
overrides (recipes/config.py lists every key). The run writes to ``{run_root}/{run_name}``:
the resolved config, ``metrics.jsonl``, and ``checkpoints/`` (resumed automatically with
``checkpoint.autoresume``).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from composer import Evaluator, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.utils import dist, get_device, reproducibility

from callbacks.batch_rampup import BatchRampSchedule, BatchRampup, RampedBatches
from callbacks.gloo_grad_average import GlooFSDP2GradAverage
from callbacks.jsonl_logger import JSONLinesLogger
from callbacks.loss_spike import LossSpikeRollback
from callbacks.positional_weighting import PositionalLossWeighting
from callbacks.pre_decay_checkpoint import PreDecayCheckpoint
from callbacks.schedulers import SCHEDULERS, build_scheduler
from common.config import ConfigError, to_dict
from common.io import atomic_write_text
from common.threads import configure_threads
from data.loader import build_dataloader
from models.composer_model import ComposerMambaLM, optimizer_param_groups
from recipes.config import SchedulerConfig, TrainConfig, load_train_config

METRIC_NAMES = ["LanguageCrossEntropy", "LanguagePerplexity", "Top1Accuracy", "Top3Accuracy", "Top10Accuracy"]


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        return "amp_bf16" if torch.cuda.is_available() else "fp32"
    if cfg.precision == "amp_bf16" and not torch.cuda.is_available():
        raise ConfigError(
            "precision=amp_bf16 needs a GPU (bf16 matmuls are ~40x slower on CPU); use fp32 or auto"
        )
    return cfg.precision


def build_model(cfg: TrainConfig, distributed: bool) -> ComposerMambaLM:
    """On GPU under FSDP the model is built on the meta device; Composer materialises each
    shard and initialises it with ``MambaLMHeadModel.param_init_fn``."""
    if distributed and cfg.fsdp.enabled and torch.cuda.is_available():
        with torch.device("meta"):
            return ComposerMambaLM(cfg.model, reset_state_at_doc_boundaries=cfg.reset_state_at_doc_boundaries)
    return ComposerMambaLM(cfg.model, reset_state_at_doc_boundaries=cfg.reset_state_at_doc_boundaries)


def build_scheduler_from(cfg: SchedulerConfig):
    """The scheduler ``cfg.name`` with the settings its constructor takes; a warning for the rest."""
    if cfg.name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name={cfg.name!r} is not one of {', '.join(SCHEDULERS)}")
    accepted = set(inspect.signature(SCHEDULERS[cfg.name].__init__).parameters) - {"self"}
    settings = {k: v for k, v in to_dict(cfg).items() if k != "name"}
    defaults = to_dict(SchedulerConfig())
    ignored = [k for k in settings if k not in accepted and settings[k] != defaults[k]]
    if ignored:
        warnings.warn(
            f"scheduler.name={cfg.name} ignores scheduler.{', scheduler.'.join(ignored)}", stacklevel=2
        )
    return build_scheduler(cfg.name, **{k: v for k, v in settings.items() if k in accepted})


def build_loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    loggers: list[LoggerDestination] = [JSONLinesLogger(cfg.run_dir / "metrics.jsonl")]
    if cfg.logging.tensorboard:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(cfg.run_dir / "tensorboard")))
    if cfg.logging.wandb_project:
        from composer.loggers import WandBLogger

        loggers.append(WandBLogger(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity))
    if cfg.logging.mlflow_experiment:
        from composer.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name=cfg.logging.mlflow_experiment))
    return loggers


def parallelism_config(cfg: TrainConfig) -> dict[str, Any] | None:
    if dist.get_world_size() == 1 or not cfg.fsdp.enabled:
        return None
    # Composer 0.32 picks FSDP2 through this variable (composer/trainer/trainer.py).
    os.environ["FSDP_VERSION"] = str(cfg.fsdp.version)
    fsdp: dict[str, Any] = {
        "activation_checkpointing": cfg.fsdp.activation_checkpointing,
        "state_dict_type": cfg.fsdp.state_dict_type,
        "mixed_precision": cfg.fsdp.mixed_precision,
    }
    if cfg.fsdp.version == 1:
        fsdp.update(sharding_strategy="FULL_SHARD", use_orig_params=True)
    return {"fsdp": fsdp}


def startup_report(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config, the git revision and package versions: logged and saved with the run."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = "unknown (not a git checkout)", False
    versions = {}
    for name in (
        "torch",
        "mosaicml",
        "mosaicml-streaming",
        "transformers",
        "tokenizers",
        "mamba-ssm",
        "causal-conv1d",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "config": to_dict(cfg),
        "git_revision": revision + (" (dirty)" if dirty else ""),
        "versions": versions,
        "world_size": dist.get_world_size(),
        "argv": sys.argv,
    }


def build_trainer(cfg: TrainConfig, extra_callbacks: list[Callback] | None = None) -> Trainer:
    # One process group for everything, before Streaming builds its shared memory (the Trainer
    # would create it only later, after the loaders).
    dist.initialize_dist(get_device("gpu" if torch.cuda.is_available() else "cpu"))
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(
            f"global_train_batch_size={cfg.global_train_batch_size} is not divisible by the {world} processes"
        )
    device_batch = cfg.global_train_batch_size // world
    if device_batch % cfg.device_train_microbatch_size:
        raise ConfigError(
            f"device_train_microbatch_size={cfg.device_train_microbatch_size} must divide the per-process batch "
            f"{device_batch} (global_train_batch_size / processes)"
        )
    if not cfg.tokenizer:
        raise ConfigError(
            "tokenizer is empty: set it to the tokenizer directory the shards were converted with"
        )
    reproducibility.seed_all(cfg.seed)

    report = startup_report(cfg)
    if dist.get_global_rank() == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.run_dir / "run.json", json.dumps(report, indent=2, default=str) + "\n")
        print(f"[train] git {report['git_revision']}; versions {report['versions']}", flush=True)
        print(f"[train] resolved config written to {cfg.run_dir / 'run.json'}", flush=True)

    model = build_model(cfg, distributed=world > 1)
    callbacks: list[Callback] = [SpeedMonitor(window_size=cfg.logging.speed_window), LRMonitor()]
    ramp = cfg.batch_rampup
    if ramp.enabled:
        # The loader serves micro-batches; RampedBatches joins as many as the ramp asks for.
        train_spec = build_dataloader(
            cfg.data, cfg.tokenizer, cfg.device_train_microbatch_size, split="train"
        )
        seq_len = train_spec.dataloader.dataset.seq_len
        schedule = BatchRampSchedule(
            ramp.start_batch_tokens,
            cfg.global_train_batch_size * seq_len,
            ramp.ramp_tokens,
            seq_len,
            cfg.device_train_microbatch_size,
            world,
        )
        train_spec.dataloader = RampedBatches(train_spec.dataloader, schedule)
        callbacks.append(BatchRampup())
    else:
        train_spec = build_dataloader(cfg.data, cfg.tokenizer, device_batch, split="train")
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
    opt = cfg.optimizer
    groups = [
        {k: v for k, v in g.items() if k != "names"} for g in optimizer_param_groups(model, opt.weight_decay)
    ]
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)

    algorithms: list[Algorithm] = [GlooFSDP2GradAverage()]  # first: before clipping sees the gradients
    if cfg.clip_grad_norm > 0:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.clip_grad_norm))
    pw = cfg.positional_weighting
    if pw.enabled:
        algorithms.append(PositionalLossWeighting(scale=pw.scale, per_document=pw.per_document, fn=pw.fn))

    ckpt = cfg.checkpoint
    save_folder = ckpt.save_folder or str(cfg.run_dir / "checkpoints")
    if ckpt.pre_decay and cfg.scheduler.name == "wsd":
        callbacks.append(PreDecayCheckpoint(save_folder=save_folder))
    elif ckpt.pre_decay:
        warnings.warn(
            f"checkpoint.pre_decay is ignored: scheduler.name={cfg.scheduler.name} has no stable phase",
            stacklevel=2,
        )
    if cfg.loss_spike.enabled:
        spike = {k: v for k, v in to_dict(cfg.loss_spike).items() if k != "enabled"}
        callbacks.append(LossSpikeRollback(**spike))
    callbacks += extra_callbacks or []

    trainer = Trainer(
        run_name=cfg.run_name,
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_interval or 1,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler_from(cfg.scheduler),
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=build_loggers(cfg),
        device="gpu" if torch.cuda.is_available() else "cpu",
        precision=resolve_precision(cfg),
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=parallelism_config(cfg),
        save_folder=save_folder,
        save_interval=ckpt.save_interval,
        save_num_checkpoints_to_keep=ckpt.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=ckpt.autoresume,
        load_path=ckpt.load_path,
        load_weights_only=ckpt.load_weights_only,
        load_ignore_keys=list(ckpt.load_ignore_keys) or None,
        seed=cfg.seed,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.console_interval,
    )
    trainer.logger.log_hyperparameters(report)  # the resolved config, revision and versions, in every logger
    return trainer


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if "=" in a]
    yamls = [a for a in argv if "=" not in a]
    if not yamls:
        raise ConfigError("usage: recipes/train.py RECIPE.yaml [MORE.yaml ...] [key=value ...]")
    return yamls, overrides


def main(argv: list[str]) -> None:
    print(configure_threads(None), flush=True)
    try:
        cfg = load_train_config(*split_args(argv))
        trainer = build_trainer(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:  # user mistakes: no traceback
        sys.exit(f"error: {exc}")
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
