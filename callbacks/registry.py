"""The parts a recipe chooses among by name: schedulers, algorithms, callbacks and loggers.

This repository's own parts and Composer's are registered side by side; a recipe adds any of
them with its constructor's arguments (``common/registry.py`` checks them)::

    scheduler: {name: wsd, t_warmup: 480ba, t_decay: 0.2, alpha_f: 0.1}
    algorithms:
      gradient_clipping: {clipping_type: norm, clipping_threshold: 1.0}
      positional_weighting: {scale: 10.0}
    callbacks:
      loss_spike: {window: 50}
      memory_monitor: {}
    loggers:
      wandb: {project: mamba, entity: my-team, tags: [ablation]}

A part inherited from a ``base:`` recipe is switched off with ``null`` (``loss_spike: null``).
"""

from __future__ import annotations

from composer import algorithms as composer_algorithms
from composer import callbacks as composer_callbacks
from composer import loggers as composer_loggers
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import ComposerScheduler, ConstantWithWarmupScheduler, LinearWithWarmupScheduler

from callbacks.loss_spike import LossSpikeRollback
from callbacks.positional_weighting import PositionalLossWeighting
from callbacks.sample_audit import SampleAudit
from callbacks.schedulers import CosineWithWarmupScheduler, DecayPhaseScheduler, WarmupStableDecayScheduler
from callbacks.wandb_logger import WandBLogger
from common.registry import Registry

schedulers: Registry[ComposerScheduler] = Registry("scheduler", "scheduler")
schedulers.register("wsd", WarmupStableDecayScheduler)
schedulers.register("cosine", CosineWithWarmupScheduler)
schedulers.register("decay_phase", DecayPhaseScheduler)
schedulers.register(
    "linear_with_warmup",
    LinearWithWarmupScheduler,
    "Composer's linear warmup then linear decay from alpha_i to alpha_f (D2Z: alpha_f 0, Bergsma et al. 2025).",
)
schedulers.register(
    "constant_with_warmup",
    ConstantWithWarmupScheduler,
    "Composer's linear warmup then a constant lr (continue a stable phase with no decay).",
)

algorithms: Registry[Algorithm] = Registry("algorithms", "algorithm")
algorithms.register("positional_weighting", PositionalLossWeighting)
algorithms.register("gradient_clipping", composer_algorithms.GradientClipping)
algorithms.register("ema", composer_algorithms.EMA)

callbacks: Registry[Callback] = Registry("callbacks", "callback")
callbacks.register("loss_spike", LossSpikeRollback)
callbacks.register("sample_audit", SampleAudit, context=["run_dir"])
for _name, _cls in [
    ("speed_monitor", composer_callbacks.SpeedMonitor),
    ("lr_monitor", composer_callbacks.LRMonitor),
    ("memory_monitor", composer_callbacks.MemoryMonitor),
    ("optimizer_monitor", composer_callbacks.OptimizerMonitor),
    ("runtime_estimator", composer_callbacks.RuntimeEstimator),
    ("system_metrics_monitor", composer_callbacks.SystemMetricsMonitor),
    ("activation_monitor", composer_callbacks.ActivationMonitor),
    ("early_stopper", composer_callbacks.EarlyStopper),
    ("threshold_stopper", composer_callbacks.ThresholdStopper),
    ("memory_snapshot", composer_callbacks.MemorySnapshot),
    ("oom_observer", composer_callbacks.OOMObserver),
]:
    callbacks.register(_name, _cls)

loggers: Registry[LoggerDestination] = Registry("loggers", "logger")
for _name, _cls, _module in [
    ("wandb", WandBLogger, "wandb"),
    ("mlflow", composer_loggers.MLFlowLogger, "mlflow"),
    ("tensorboard", composer_loggers.TensorboardLogger, "tensorboard"),
    ("cometml", composer_loggers.CometMLLogger, "comet_ml"),
]:
    loggers.register(_name, _cls, requires=[(_module, f"mosaicml[{_name}]==0.32.1")])
loggers.register("file", composer_loggers.FileLogger)

REGISTRIES: dict[str, Registry] = {
    "scheduler": schedulers,
    "algorithms": algorithms,
    "callbacks": callbacks,
    "loggers": loggers,
}
