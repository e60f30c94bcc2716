"""The training recipe's typed config tree (``yamls/*.yaml`` + ``key=value`` overrides).

One dataclass per section; each setting has its one default here. ``load_train_config``
applies the model preset first (``model_preset: 0.5b``), then the YAML files and the command
line, so a recipe reads "the 0.5b model, but with d_state 32".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from common.config import ConfigError, load_config
from data.loader import DataConfig
from models.config import PRESETS, MambaConfig, preset
from recipes.init_from import InitFromConfig


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay); the paper: betas (0.9, 0.95), weight decay 0.1."""

    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to the decayed group only (models/composer_model.py: decays)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr={self.lr} must be > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optimizer.beta1/beta2=({self.beta1}, {self.beta2}) must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class SchedulerConfig:
    """The learning-rate schedule (callbacks/schedulers.py): wsd | cosine | d2z | decay_phase."""

    name: str = "wsd"
    t_warmup: str = "0ba"  # wsd, cosine, d2z
    t_decay: float | str = 0.2  # wsd: fraction of training (0.2 = last 20%) or a time ('3e10tok')
    decay_shape: str = "linear"  # wsd, decay_phase: linear | cosine | 1-sqrt | exponential
    alpha_f: float = 0.1  # final lr / peak lr (wsd, cosine, decay_phase); the paper: 2e-4 / 2e-3
    t_start: str = "0ba"  # decay_phase: when the decay starts (0ba after a weights-only load)
    scale_warmup: bool = False


@dataclass
class PositionalWeightingConfig:
    """Token loss x tanh(position / scale) (the paper's section 4.2)."""

    enabled: bool = False
    scale: float = 10.0
    per_document: bool = True  # positions restart after each end-of-text; false = per sequence
    fn: str = "tanh"


@dataclass
class BatchRampupConfig:
    """Global batch grown linearly in tokens up to global_train_batch_size (callbacks/batch_rampup.py).

    The paper ramps to 2M tokens over the first 1B tokens; it gives no start size. Give the
    scheduler's warmup in tokens when the ramp is on: steps no longer map to tokens.
    """

    enabled: bool = False
    start_batch_tokens: int = 262144
    ramp_tokens: int = 1_000_000_000


@dataclass
class LossSpikeConfig:
    """Roll back to the last good checkpoint on a loss spike, skipping the data (callbacks/loss_spike.py).

    A spike: loss > mean + max(threshold_std * std, min_rel_increase * mean) of the last
    ``window`` accepted losses, or a non-finite loss.
    """

    enabled: bool = False
    window: int = 50
    threshold_std: float = 4.0
    min_rel_increase: float = 0.1
    warmup_batches: int = 50
    max_retries: int = 3
    recovery_batches: int = 20
    audit_file: str | None = None  # None = loss_spikes.jsonl in the checkpoint folder


@dataclass
class CheckpointConfig:
    save_folder: str = ""  # "" = {run_dir}/checkpoints
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1  # -1 keeps all (the paper released 80+ checkpoints)
    autoresume: bool = True  # resume from the latest checkpoint in save_folder if there is one
    load_path: str | None = None  # start from this checkpoint (e.g. a pre-decay checkpoint)
    load_weights_only: bool = False
    # Parts of the loaded checkpoint to ignore (Composer globs). A decay phase started from a
    # pre-decay checkpoint keeps weights and optimizer state but not the old data position,
    # schedule, clock or callback state:
    # ["state/timestamp", "state/dataset_state", "state/schedulers", "state/callbacks"].
    load_ignore_keys: list[str] = field(default_factory=list)
    pre_decay: bool = True  # save pre-decay-*.pt when the WSD stable phase ends


@dataclass
class FSDPConfig:
    """Composer FSDP, one unit per Mamba block (models/mamba_lm.py: fsdp_wrap_fn)."""

    enabled: bool = True  # used only with more than one process
    version: int = 2  # 1 (FullyShardedDataParallel) | 2 (fully_shard; the only one on CPU)
    activation_checkpointing: bool = False  # recompute each block in backward (the paper)
    state_dict_type: str = "sharded"  # sharded | full checkpoints
    mixed_precision: str = "FULL"  # FULL keeps parameters and gradient reduction in fp32

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"fsdp.version={self.version} must be 1 or 2")
        if self.state_dict_type not in ("sharded", "full"):
            raise ValueError(f"fsdp.state_dict_type={self.state_dict_type!r} must be 'sharded' or 'full'")


@dataclass
class LoggingConfig:
    console_interval: str = "10ba"
    progress_bar: bool = True
    tensorboard: bool = False
    wandb_project: str | None = None  # set to log to Weights & Biases
    wandb_entity: str | None = None
    mlflow_experiment: str | None = None  # set to log to MLflow
    speed_window: int = 20  # batches averaged by the throughput / MFU monitor


@dataclass
class TrainConfig:
    base: str = ""  # a recipe this one extends (path relative to this file), loaded first
    run_name: str = "mamba"
    run_root: str = "runs"  # run_dir = {run_root}/{run_name}: checkpoints, metrics.jsonl, plots
    seed: int = 17
    model_preset: str | None = None  # a models/config.py preset applied before `model:` fields
    model: MambaConfig = field(default_factory=MambaConfig)
    init_from: InitFromConfig | None = None  # start the model from a checkpoint (recipes/init_from.py)
    tokenizer: str = ""  # the tokenizer directory the shards were converted with
    data: DataConfig = field(default_factory=lambda: DataConfig(mixture="unset"))
    eval_interval: str | None = "500ba"  # null disables evaluation
    eval_subset_num_batches: int = -1  # -1 = the whole validation split
    global_train_batch_size: int = 8  # samples (of seq_len tokens) per optimizer step, all ranks
    device_train_microbatch_size: int = 4
    device_eval_batch_size: int = 8
    max_duration: str = "100ba"
    precision: str = "auto"  # auto: amp_bf16 on GPU, fp32 on CPU | fp32 | amp_bf16
    clip_grad_norm: float = 1.0  # <= 0 disables clipping
    # Restart the recurrent state at each document boundary inside a packed sample (Mamba-2's
    # seq_idx; attention layers then stay inside documents too). Off, as in the paper: the state
    # flows from one document into the next. Mamba-1 has no such kernel option.
    reset_state_at_doc_boundaries: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    positional_weighting: PositionalWeightingConfig = field(default_factory=PositionalWeightingConfig)
    batch_rampup: BatchRampupConfig = field(default_factory=BatchRampupConfig)
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "amp_bf16"):
            raise ValueError(f"precision={self.precision!r} must be auto, fp32 or amp_bf16")
        if self.device_train_microbatch_size < 1 or self.global_train_batch_size < 1:
            raise ValueError("global_train_batch_size and device_train_microbatch_size must be >= 1")
        if self.reset_state_at_doc_boundaries and self.model.ssm.layer != "mamba2":
            raise ValueError(
                "reset_state_at_doc_boundaries=true needs Mamba-2 layers (model.ssm.layer=mamba2): "
                "mamba_ssm's Mamba-1 selective scan cannot restart its state inside a sequence"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.run_name


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
            raw = OmegaConf.load(current)
            base = raw.get("base") if OmegaConf.is_dict(raw) else None
            current = (current.parent / base).resolve() if base else None
        expanded += reversed(chain)
    return expanded


def _requested_preset(yaml_paths: Sequence[str | Path], overrides: Sequence[str]) -> str | None:
    """``model_preset`` as the YAMLs and the command line set it, read before the strict merge."""
    name = None
    for path in yaml_paths:
        raw = OmegaConf.load(path)
        if OmegaConf.is_dict(raw):
            name = raw.get("model_preset", name)
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model_preset":
            name = value.strip() or None
    return name


def load_train_config(yaml_paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML recipes (merged in order) + ``key=value`` overrides -> a checked ``TrainConfig``."""
    yaml_paths = expand_bases(yaml_paths)
    name = _requested_preset(yaml_paths, overrides)
    if name is not None and name not in PRESETS:
        raise ConfigError(f"model_preset={name!r} is not a preset; valid presets: {', '.join(PRESETS)}")
    base = TrainConfig(model_preset=name, model=preset(name) if name else MambaConfig())
    return load_config(base, yaml_paths, overrides)
