"""The training recipe's typed config tree (``yamls/*.yaml`` + ``key=value`` overrides).

One dataclass per section, each setting with its one default. Sections that configure a part
of the run hold the settings that build it (``OptimizerConfig.build``, ``FSDPConfig.parallelism``,
``BatchRampupConfig.schedule``, ``DataConfig`` for the loader, ``MambaConfig`` for the model).
The parts a recipe chooses among by name (``scheduler``, ``algorithms``, ``callbacks``,
``loggers``) are ``{name: arguments}`` sections checked against the registered constructor
(``callbacks/registry.py``), whose signature is their only definition.

``load_train_config`` applies the model preset first (``model_preset: 0.5b``), then the YAML
files (each after the ``base:`` chain it extends) and the command line, and checks the whole
tree, reporting every problem at once. What only the files on disk can tell (the tokenizer's
vocabulary, the shards' sequence length) is checked by ``recipes/train.py`` before it writes
anything.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from composer.core import Time
from omegaconf import MISSING, OmegaConf

from callbacks.batch_rampup import BatchRampupConfig
from callbacks.registry import REGISTRIES
from common.config import ConfigError, load_sources, load_yaml, read_sources, report, to_dict
from data.loader import DataConfig
from handover.init_from import InitFromConfig
from models.config import PRESETS, MambaConfig, preset
from recipes.units import time_problem

Precision = Literal["auto", "fp32", "amp_bf16"]


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay); the paper: betas (0.9, 0.95), weight decay 0.1."""

    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to the decayed group only (models/composer_model.py: decays)

    def __post_init__(self) -> None:
        problems = []
        if self.lr <= 0:
            problems.append(f"optimizer.lr={self.lr} must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"optimizer.beta1/beta2=({self.beta1}, {self.beta2}) must be in [0, 1)")
        if self.weight_decay < 0:
            problems.append(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        report(problems)

    def build(self, param_groups: list[dict[str, Any]]) -> torch.optim.AdamW:
        """AdamW over ``param_groups`` (each with its own ``weight_decay``)."""
        return torch.optim.AdamW(param_groups, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps)


@dataclass
class CheckpointConfig:
    save_folder: str = (
        ""  # a local folder or an object-store URI (s3://, gs://, oci://); "" = {run_dir}/checkpoints
    )
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1  # -1 keeps all (the paper released 80+ checkpoints)
    autoresume: bool = True  # resume from the latest checkpoint in save_folder if there is one
    load_path: str | None = None  # start from this checkpoint (e.g. a pre-decay checkpoint)
    load_weights_only: bool = False
    # load_path is read as data (weights_only=True): true reads it as full pickle, which can run
    # code; only for a checkpoint whose origin you trust. The run's own autoresume is always read.
    trust: bool = False
    # Parts of load_path's checkpoint to ignore (Composer globs); null = as the recipe implies: a
    # decay (scheduler.name: decay_phase, t_start 0) keeps the weights and optimizer state but not the
    # old clock, data position, schedule or callback state (recipes/plan.py, DECAY_IGNORE_KEYS);
    # any other run loads everything.
    load_ignore_keys: list[str] | None = None
    pre_decay: bool = (
        True  # save a checkpoint when the WSD stable phase ends (callbacks/pre_decay_checkpoint.py)
    )
    pre_decay_folder: str = ""  # "" = {save_folder}/pre-decay
    # On an object store, the `latest` link is written once every file of the checkpoint is there;
    # Composer checks for them every 30 s (CheckpointSaver's default), which suits checkpoints that
    # take minutes to upload. A run whose checkpoints upload in a second (tiny runs, the tests) would
    # wait up to 30 s at its end for each link: set a few seconds.
    remote_poll_seconds: float = 30.0


@dataclass
class FSDPConfig:
    """Composer FSDP, one unit per Mamba block (models/mamba_lm.py: fsdp_wrap_fn)."""

    enabled: bool = True  # used only with more than one process (see single_process)
    single_process: bool = False  # wrap a one-process run too (the GPU check: FSDP on one GPU)
    version: Literal[1, 2] = 2  # 1 (FullyShardedDataParallel, GPU only) | 2 (fully_shard; also on CPU)
    activation_checkpointing: bool = False  # recompute each block in backward (the paper)
    state_dict_type: Literal["sharded", "full"] = "sharded"
    # Composer's FSDP mixed precision, applied with `precision` (README "GPU precision"): DEFAULT
    # gathers bf16 copies of the fp32 parameters for compute and reduces gradients in fp32 (the
    # paper's bf16 mixed-precision training); FULL gathers fp32 (twice the traffic), PURE also
    # reduces in bf16. With fp32 precision (every CPU run) all three are fp32 throughout.
    mixed_precision: Literal["FULL", "DEFAULT", "PURE"] = "DEFAULT"

    def parallelism(self, world_size: int) -> dict[str, Any] | None:
        """Composer's ``parallelism_config``, or None for a single process."""
        if not self.enabled or (world_size == 1 and not self.single_process):
            return None
        fsdp: dict[str, Any] = {
            "activation_checkpointing": self.activation_checkpointing,
            "state_dict_type": self.state_dict_type,
            "mixed_precision": self.mixed_precision,
        }
        if self.version == 1:
            fsdp.update(sharding_strategy="FULL_SHARD", use_orig_params=True)
        return {"fsdp": fsdp}


@dataclass
class LoggingConfig:
    """The console (callbacks/console_progress.py); every metric reaches metrics.jsonl and the loggers."""

    progress_bar: bool = True  # a progress line redrawn in place; false: a new line every console_interval
    console_interval: str = "10ba"  # batches between console lines (progress_bar off, or verbose)
    verbose: bool = False  # Composer's full metric dump every console_interval instead (--verbose)

    def __post_init__(self) -> None:
        number = self.console_interval.removesuffix("ba")
        if not (self.console_interval.endswith("ba") and number.isdigit() and int(number) > 0):
            report(
                [
                    f"logging.console_interval={self.console_interval!r} must be a number of batches, e.g. '10ba'"
                ]
            )

    @property
    def interval_batches(self) -> int:
        return int(self.console_interval.removesuffix("ba"))


def _default_algorithms() -> dict[str, dict[str, Any] | None]:
    return {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}  # the paper: clip 1.0


def _default_callbacks() -> dict[str, dict[str, Any] | None]:
    return {"speed_monitor": {"window_size": 20, "time_unit": "seconds"}, "lr_monitor": {}}


@dataclass
class TrainConfig:
    base: str = ""  # a recipe this one extends (path relative to this file), loaded first
    run_name: str = "mamba"
    run_root: str = "runs"  # run_dir = {run_root}/{run_name}: checkpoints, metrics.jsonl, plots
    seed: int = 17
    model_preset: str | None = None  # a models/config.py preset applied before `model:` fields
    model: MambaConfig = field(default_factory=MambaConfig)
    init_from: InitFromConfig | None = None  # start the model from a checkpoint (handover/init_from.py)
    tokenizer: str = MISSING  # the tokenizer directory the shards were converted with
    data: DataConfig = field(default_factory=DataConfig)
    eval_interval: str | None = "500ba"  # null disables evaluation
    eval_subset_num_batches: int = -1  # -1 = the whole validation split
    global_train_batch_size: int = 8  # samples (of seq_len tokens) per optimizer step, all ranks
    device_train_microbatch_size: int = 4
    device_eval_batch_size: int = 8
    max_duration: str = "100ba"
    precision: Precision = "auto"  # auto: amp_bf16 on GPU, fp32 on CPU
    # Intra-op threads per process; null = OMP_NUM_THREADS if set, else the cores this process may
    # use / the processes on this node (common/threads.py). Set 1 on a machine shared with other jobs.
    threads: int | None = None
    # Restart the recurrent state at each document boundary inside a packed sample (Mamba-2's
    # seq_idx; attention layers then stay inside documents too). Off, as in the paper: the state
    # flows from one document into the next. Mamba-1 has no such kernel option.
    reset_state_at_doc_boundaries: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # {name: ..., arguments}: a registered schedule (callbacks/registry.py). A recipe naming
    # another schedule than its base replaces the base's scheduler section.
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "wsd"})
    # {name: arguments} of registered parts; null switches off one inherited from a base recipe.
    algorithms: dict[str, dict[str, Any] | None] = field(default_factory=_default_algorithms)
    callbacks: dict[str, dict[str, Any] | None] = field(default_factory=_default_callbacks)
    loggers: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    batch_rampup: BatchRampupConfig | None = None  # a mapping turns the ramp on
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.device_train_microbatch_size < 1 or self.global_train_batch_size < 1:
            problems.append("global_train_batch_size and device_train_microbatch_size must be >= 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads={self.threads} must be >= 1, or null to size from the cores available")
        if self.reset_state_at_doc_boundaries and self.model.ssm.layer != "mamba2":
            problems.append(
                "reset_state_at_doc_boundaries=true needs Mamba-2 layers (model.ssm.layer=mamba2): "
                "mamba_ssm's Mamba-1 selective scan cannot restart its state inside a sequence"
            )
        name = self.scheduler.get("name")
        if name is None:
            problems.append(
                f"scheduler.name is not set; registered schedules: {', '.join(REGISTRIES['scheduler'].names())}"
            )
        checks = [("scheduler", name, {k: v for k, v in self.scheduler.items() if k != "name"}, "scheduler")]
        for key in ("algorithms", "callbacks", "loggers"):
            checks += [(key, part, args, f"{key}.{part}") for part, args in self.parts(key).items()]
        problems += time_problems(self)
        for key, part, args, where in checks:
            if part is None:
                continue
            try:
                if key in ("algorithms", "callbacks"):  # built once here: their own checks run now
                    problems += REGISTRIES[key].problems(part, args, where)
                else:
                    REGISTRIES[key].resolve(part, args, where)
            except ConfigError as exc:
                problems.extend(exc.problems)
        report(problems)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.run_name

    def parts(self, key: str) -> dict[str, dict[str, Any]]:
        """The switched-on parts of a registry section (``algorithms``, ``callbacks``, ``loggers``)."""
        return {name: dict(args) for name, args in getattr(self, key).items() if args is not None}

    def scheduler_args(self) -> tuple[str, dict[str, Any]]:
        """The scheduler's registered name and its arguments (defaults filled in)."""
        args = dict(self.scheduler)
        name = args.pop("name")
        return name, REGISTRIES["scheduler"].resolve(name, args, "scheduler")


_TIME_KEYS = (
    ("max_duration", "100ba"),
    ("eval_interval", "500ba"),
    ("checkpoint.save_interval", "1000ba"),
    ("logging.console_interval", "10ba"),
)


def time_problems(cfg: TrainConfig) -> list[str]:
    """The config's Composer time strings, each a number and a unit (``ba``, ``tok``, ``sp``, ``ep``).

    Composer reads a bare number as seconds (``max_duration=2`` as 20 seconds): every time is
    checked here, naming its key and echoing what was typed. The schedule's ``t_*`` times may also
    be fractions of the run (``0.2``, ``'0.2dur'``).
    """
    problems = []
    for key, example in _TIME_KEYS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None and key == "eval_interval":
            continue
        problem = time_problem(key, value, example, fraction=False)
        if problem is None and Time.from_timestring(str(value)).value <= 0:
            off = " (evaluation is switched off with eval_interval=null)" if key == "eval_interval" else ""
            problem = f"{key}={value!r} must be > 0{off}"
        if problem:
            problems.append(problem)
    args = {k: v for k, v in cfg.scheduler.items() if k != "name"}
    try:  # typed by the schedule's signature: a number given for a time argument becomes a string
        args = REGISTRIES["scheduler"].resolve(cfg.scheduler.get("name"), args, "scheduler")
    except ConfigError:
        return problems  # an unknown schedule or a bad argument: the registry check reports it
    for key, value in args.items():
        if key.startswith("t_") and isinstance(value, str):
            problem = time_problem(f"scheduler.{key}", value, "100ba", fraction=True)
            if problem:
                problems.append(problem)
    return problems


def resolved_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data with every registered part's defaults filled in (run.json, --print-config)."""
    out = to_dict(cfg)
    name, args = cfg.scheduler_args()
    out["scheduler"] = {"name": name, **args}
    for key in ("algorithms", "callbacks", "loggers"):
        out[key] = {part: REGISTRIES[key].resolve(part, args) for part, args in cfg.parts(key).items()}
    return out


# ----------------------------------------------------------------------------------------------
# Loading


def expand_bases(yaml_paths: Sequence[str | Path]) -> list[Path]:
    """Each recipe preceded by the chain of recipes it extends with ``base:``."""
    expanded: list[Path] = []
    for path in map(Path, yaml_paths):
        chain: list[Path] = []
        current: Path | None = path
        while current is not None:
            if current in chain:
                raise ConfigError(f"recipe {path} has a cycle of base: recipes: {[str(p) for p in chain]}")
            if not current.is_file():
                raise ConfigError(
                    f"recipe file not found: {current}" + (f" (base of {chain[0]})" if chain else "")
                )
            chain.append(current)
            base = load_yaml(current).get("base")
            current = (current.parent / base).resolve() if base else None
        expanded += reversed(chain)
    return expanded


def explicitly_set(sources: Sequence[tuple[str, Any]], key: str) -> bool:
    """Whether a recipe or the command line sets ``key`` (dotted), as opposed to a preset or default."""
    return any(
        OmegaConf.is_dict(node) and OmegaConf.select(node, key, default=MISSING) is not MISSING
        for _, node in sources
    )


def _restart_scheduler(sources: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Drop the scheduler sections that a later source discards by naming another schedule.

    The arguments of one schedule mean nothing to another (``t_decay`` of ``wsd`` is no argument of
    ``cosine``), so a recipe that names a different schedule than the ones before it starts the
    scheduler section afresh, whether it extends them with ``base:`` or follows them.
    """
    current, restart = "wsd", 0
    for i, (_, node) in enumerate(sources):
        name = OmegaConf.select(node, "scheduler.name", default=None) if OmegaConf.is_dict(node) else None
        if name is not None and name != current:
            restart, current = i, name
    kept = []
    for i, (label, node) in enumerate(sources):
        if i < restart and OmegaConf.is_dict(node) and "scheduler" in node:
            node = OmegaConf.masked_copy(node, [k for k in node if k != "scheduler"])
        kept.append((label, node))
    return kept


def load_train_config(yaml_paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML recipes (merged in order) + ``key=value`` overrides -> a checked ``TrainConfig``."""
    sources = _restart_scheduler(read_sources(expand_bases(yaml_paths), overrides))
    name = None
    for _, node in sources:
        if OmegaConf.is_dict(node):
            name = OmegaConf.select(node, "model_preset", default=name)
    if name is not None and name not in PRESETS:
        raise ConfigError(f"model_preset={name!r} is not a preset; valid presets: {', '.join(PRESETS)}")
    base = TrainConfig(model_preset=name, model=preset(name) if name else MambaConfig())
    vocab = _tokenizer_vocab(sources)
    if vocab is not None and not explicitly_set(sources, "model.vocab_size"):
        # The model's vocabulary follows the recipe's tokenizer unless the recipe sets it.
        sources.insert(0, ("the tokenizer's vocabulary", {"model": {"vocab_size": vocab}}))
    return load_sources(base, sources)


def _tokenizer_vocab(sources: Sequence[tuple[str, Any]]) -> int | None:
    """The vocabulary size of the tokenizer the sources name, or None if there is none to read yet
    (a missing tokenizer is reported by the run's checks, with its fix)."""
    from data.tokenizer import vocabulary_size

    path = None
    for _, node in sources:
        if OmegaConf.is_dict(node):
            path = OmegaConf.select(node, "tokenizer", default=path)
    if not isinstance(path, str) or not path:
        return None
    try:
        return vocabulary_size(path)
    except Exception:  # missing or unreadable (tokenizers raises a bare Exception): checked later
        return None


PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
