"""The plan of a training run: everything derived from the resolved config and the files it names.

``plan_run`` is the one place a run reads its inputs before it is built: the tokenizer (once),
the data mixture and each split's index files (once), the checkpoint to load (verified, its
shapes and its clock), the ``init_from`` source (read, selected and checked against the model).
It derives the batch geometry, the precision, the FSDP settings and the schedule on the run's
geometry, and checks everything that can be checked before compute; every problem found is
reported at once, each naming the key or file and the fix. ``recipes/train.py`` builds the
Trainer from the ``RunPlan`` alone: it reads no file the plan read and derives nothing again.

A plan that would train nothing, or something other than the recipe says, is refused:

- a checkpoint whose clock is at or past ``max_duration`` (the run would stop before its first
  batch);
- a decay (``scheduler.name: decay_phase``) from ``checkpoint.load_path`` starts its own clock:
  unless the recipe sets ``checkpoint.load_ignore_keys`` itself, the plan ignores the
  checkpoint's clock, data position, schedule and callback state (``DECAY_IGNORE_KEYS``) when
  the decay starts at 0 (``scheduler.t_start``), and keeps them when ``t_start`` names a later
  time (a decay continuing the checkpoint's own clock). Whatever still disagrees (a clock kept
  past ``t_start`` or ``max_duration``) names the keys to change.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from composer.core import Time, Timestamp, TimeUnit
from composer.utils import format_name_with_dist, parse_uri

from callbacks import registry
from callbacks.batch_rampup import BatchRampSchedule
from common import cli
from common.config import ConfigError
from common.io import check_output_path
from data.loader import SplitPlan, phase_streams_of, plan_split, shard_file_problems
from data.mixture import StreamConfig
from data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from handover.init_from import InitFromPlan, plan_init_from
from handover.integrity import shape_problems
from handover.reader import check_as_data, read_composer, read_sharded, verify
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig, resolved_dict
from recipes.units import CONVERTIBLE, Geometry, convert_schedule_times

# What a decay from a pre-decay checkpoint leaves behind: the old clock, data position, schedule and
# callback state (the README's "Continue pre-training, or run your own decay").
DECAY_IGNORE_KEYS = ("state/timestamp", "state/dataset_state", "state/schedulers", "state/callbacks")


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        return "amp_bf16" if torch.cuda.is_available() else "fp32"
    if cfg.precision == "amp_bf16" and not torch.cuda.is_available():
        raise ConfigError(
            "precision=amp_bf16 needs a GPU (bf16 matmuls are ~40x slower on CPU); use fp32 or auto"
        )
    return cfg.precision


# ----------------------------------------------------------------------------------------------
# The parts of a plan


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step is split over processes and micro-batches."""

    world_size: int
    global_batch: int  # samples per optimizer step, all processes (the target, with a ramp)
    device_batch: int  # samples per process per optimizer step
    micro_batch: int  # samples per forward/backward on one process
    seq_len: int  # tokens per sample (0: every stream is remote, known once downloaded)
    ramp: BatchRampSchedule | None = None

    @property
    def accumulation(self) -> int:
        """Micro-batches per process per optimizer step (at the target batch, with a ramp)."""
        return self.device_batch // self.micro_batch

    @property
    def tokens_per_batch(self) -> int:
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class TokenizerPlan:
    """The run's tokenizer, read once: its identity and the special-token ids a checkpoint records."""

    path: str
    info: TokenizerInfo
    special_token_ids: dict[str, int | None] | None  # as transformers reads them; None: unreadable there


@dataclass(frozen=True)
class DataPlan:
    """The phase's streams and each split the run reads, checked against the tokenizer."""

    phase: str
    streams: dict[str, StreamConfig]
    train: SplitPlan
    val: SplitPlan | None  # None: evaluation is off


@dataclass(frozen=True)
class SchedulePlan:
    """The learning-rate schedule on one run's geometry (``plan_schedule``)."""

    name: str
    args: dict[str, Any]  # times converted to max_duration's unit
    geometry: Geometry
    notes: list[str]
    problems: list[str]


@dataclass(frozen=True)
class LoadPlan:
    """The Composer checkpoint the Trainer loads at start-up, and what of it the run keeps."""

    key: str  # the config key it comes from, or "the run's latest checkpoint"
    path: str
    own: bool  # the run's own autoresume (trusted, loaded whole by Composer)
    ignore_keys: tuple[str, ...]  # Composer's load_ignore_keys
    clock: dict[str, int] | None  # the checkpoint's batch/sample/token; None: remote, read by Composer
    # run.json's ``load_path_source``: the checkpoint.load_path the run started from, its tokens and
    # whether its clock goes on (a resume keeps its first start's record); None when unknown
    source: dict[str, Any] | None = None

    @property
    def keeps_clock(self) -> bool:
        return not any(fnmatch.fnmatch("state/timestamp", key) for key in self.ignore_keys)


@dataclass(frozen=True)
class RunPlan:
    """Everything the build needs, derived once from the resolved config and the files it names."""

    cfg: TrainConfig
    resolved: dict[str, Any]  # the config as data, every registered part's defaults filled in
    geometry: BatchGeometry
    precision: str
    parallelism: dict[str, Any] | None  # Composer's parallelism_config (FSDP), None for one process
    tokenizer: TokenizerPlan
    data: DataPlan
    schedule: SchedulePlan
    save_folder: str
    pre_decay_folder: str
    load: LoadPlan | None
    init_from: InitFromPlan | None
    notes: tuple[str, ...] = field(default_factory=tuple)  # conversions and choices, printed at start-up

    def describe(self) -> list[str]:
        """The plan in a few lines (``--print-plan`` and the start of every run)."""
        g, cfg = self.geometry, self.cfg
        fsdp = "off" if self.parallelism is None else f"FSDP{cfg.fsdp.version} {self.parallelism['fsdp']}"
        lines = [
            f"run       {cfg.run_dir} (checkpoints: {self.save_folder})",
            f"geometry  {g.world_size} process(es) x {g.device_batch} samples = {g.global_batch} samples "
            f"x {g.seq_len} tokens = {g.tokens_per_batch} tokens per batch; micro-batch {g.micro_batch}, "
            f"{g.accumulation} accumulation step(s)" + (" at the target batch (ramped)" if g.ramp else ""),
            f"precision {self.precision}; fsdp {fsdp}",
            f"tokenizer {self.tokenizer.path}: {self.tokenizer.info.vocab_size} tokens "
            f"({self.tokenizer.info.fingerprint[:12]}); model vocabulary {cfg.model.padded_vocab_size} rows",
            f"data      {cfg.data.mixture} phase {self.data.phase}: "
            + ", ".join(f"{name} ({_weight(s)})" for name, s in self.data.streams.items())
            + ("" if self.data.val else "; no evaluation"),
            f"schedule  {self.schedule.name} {self.schedule.args} over max_duration={cfg.max_duration}"
            + _in_batches(cfg.max_duration, self.schedule.geometry),
        ]
        if self.load is not None:
            clock = f", saved at batch {self.load.clock['batch']}" if self.load.clock else ""
            kept = "its clock" if self.load.keeps_clock else "a fresh clock"
            ignored = f" (ignoring {list(self.load.ignore_keys)})" if self.load.ignore_keys else ""
            lines.append(f"load      {self.load.key}={self.load.path}{clock}; {kept}{ignored}")
        if self.init_from is not None:
            lines.append(
                f"init_from {self.init_from.source} ({self.init_from.format}): "
                f"{len(self.init_from.weights)} tensors"
            )
        lines += [f"note      {note}" for note in self.notes]
        return lines


def _weight(stream: StreamConfig) -> str:
    for key in ("proportion", "repeat", "choose"):
        if getattr(stream, key) is not None:
            return f"{key} {getattr(stream, key)}"
    return "one epoch"


def _in_batches(max_duration: str, geometry: Geometry) -> str:
    end = Time.from_timestring(max_duration)
    if end.unit not in CONVERTIBLE or end.unit == TimeUnit.BATCH or not geometry.seq_len:
        return ""
    return f" = {geometry.convert(end, TimeUnit.BATCH).value} batches"


# ----------------------------------------------------------------------------------------------
# The checks


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
    if not seq_len:  # every stream remote: times stay in the recipe's units, checked by Composer
        return SchedulePlan(name, args, geometry, [], problems)
    args, notes, unit_problems = convert_schedule_times(name, args, cfg.max_duration, geometry)
    schedule_problems = unit_problems or _schedule_problems(name, args, cfg.max_duration, geometry)
    return SchedulePlan(name, args, geometry, notes, problems + schedule_problems)


def join_folder(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or an object-store URI."""
    backend, bucket, path = parse_uri(folder)
    return f"{backend}://{bucket}/{path.rstrip('/')}/{name}" if backend else str(Path(folder) / name)


def _checkpoint_to_load(cfg: TrainConfig, save_folder: str) -> tuple[str, str, bool] | None:
    """(config key, path, whether it is the run's own) of the checkpoint the Trainer will load."""
    folder = format_name_with_dist(save_folder, cfg.run_name)
    latest = Path(folder) / "latest-rank0.pt"
    if cfg.checkpoint.autoresume and not parse_uri(folder)[0] and latest.exists():
        return "the run's latest checkpoint", str(latest.resolve()), True
    if cfg.checkpoint.load_path:
        return "checkpoint.load_path", cfg.checkpoint.load_path, False
    return None


CLOCK_KEYS = {TimeUnit.BATCH: "batch", TimeUnit.SAMPLE: "sample", TimeUnit.TOKEN: "token"}


def _checkpoint_clock(path: str, trust: bool) -> dict[str, int]:
    """The batch, sample and token counts a local Composer checkpoint was saved at (already verified)."""
    if Path(path).is_dir():
        flat = read_sharded(path, lambda k: k.startswith("state.timestamp."), opt_in="checkpoint.trust=true")
        stamp = {k.rsplit(".", 1)[-1]: v for k, v in flat.items()}
    else:
        state = read_composer(path, trust=trust, opt_in="checkpoint.trust=true", keep=True)
        stamp = state["state"].get("timestamp", {}).get("Timestamp", {})
    return {unit: int(stamp.get(unit, 0)) for unit in CLOCK_KEYS.values()}


def _plan_load(
    cfg: TrainConfig, save_folder: str, expected: dict[str, tuple[int, ...]], schedule: SchedulePlan
) -> tuple[LoadPlan | None, list[str], list[str]]:
    """The checkpoint to load, checked (integrity, trust, shapes, clock); (plan, problems, notes)."""
    to_load = _checkpoint_to_load(cfg, save_folder)
    if to_load is None:
        return None, [], []
    key, path, own = to_load
    remote = bool(parse_uri(path)[0])
    ignore = list(cfg.checkpoint.load_ignore_keys or []) if not own else []
    notes: list[str] = []
    t_start = None
    if schedule.name == "decay_phase":
        t_start = Time.from_timestring(str(schedule.args.get("t_start", "0ba")))
    if t_start is not None and t_start.value == 0 and not own and cfg.checkpoint.load_ignore_keys is None:
        ignore = list(DECAY_IGNORE_KEYS)
        notes.append(
            f"checkpoint.load_path: the decay starts its own clock (scheduler.t_start={t_start.value}{t_start.unit.value}): the "
            f"checkpoint's weights and optimizer state are loaded, not {ignore}"
        )
    problems: list[str] = []
    clock = None
    if not remote:
        verify(path, key)  # a corrupt file is a fault (exit 3), named before anything else
        trust = own or cfg.checkpoint.trust
        if not trust:
            check_as_data(path, key, opt_in="checkpoint.trust=true")
        if not any("model" in k for k in ignore):
            problems += shape_problems(path, expected, key, trust=trust, opt_in="checkpoint.trust=true")
        clock = _checkpoint_clock(path, trust)
    plan = LoadPlan(key, path, own, tuple(ignore), clock)
    if clock is not None and plan.keeps_clock and not own:
        problems += _clock_problems(cfg, plan, clock, t_start)
    if own and cfg.checkpoint.load_path:  # a resume: where the run first started is in its run.json
        run_json = cfg.run_dir / "run.json"
        try:
            plan = replace(plan, source=json.loads(run_json.read_text()).get("load_path_source"))
        except (OSError, ValueError) as exc:
            notes.append(f"{run_json} is unreadable ({exc}): eval.report will draw this run from token 0")
    elif clock is not None and not own:
        plan = replace(
            plan, source={"path": path, "tokens_seen": clock["token"], "clock_kept": plan.keeps_clock}
        )
    return plan, problems, notes


def _clock_problems(
    cfg: TrainConfig, load: LoadPlan, clock: dict[str, int], t_start: Time | None
) -> list[str]:
    """A kept clock that leaves nothing to train, or a decay that would start part-way, named with its keys."""
    end = Time.from_timestring(cfg.max_duration)
    if end.unit not in CONVERTIBLE:
        return []
    now = clock[CLOCK_KEYS[end.unit]]
    where = f"{load.key}={load.path} was saved at batch {clock['batch']} ({now}{end.unit.value})"
    if now >= end.value:
        fix = (
            "a decay from a pre-decay checkpoint starts its own clock: remove checkpoint.load_ignore_keys "
            f"from the recipe (or set it to {list(DECAY_IGNORE_KEYS)}), or set max_duration past the checkpoint"
            if t_start is not None
            else f"set max_duration past {now}{end.unit.value} (it counts from the checkpoint's clock), or add "
            "'state/timestamp' to checkpoint.load_ignore_keys to start a fresh clock"
        )
        return [
            f"{where}, at or past max_duration={cfg.max_duration}, and checkpoint.load_ignore_keys="
            f"{list(load.ignore_keys)} keeps that clock: the run would train nothing; {fix}"
        ]
    if t_start is not None and t_start.unit == end.unit and t_start.value < now:
        return [
            f"{where} and checkpoint.load_ignore_keys={list(load.ignore_keys)} keeps that clock, but "
            f"scheduler.t_start={t_start.value}{t_start.unit.value} is before it: the decay would start part-way down. Set "
            f"scheduler.t_start={now}{end.unit.value} to decay from the checkpoint's clock, or remove "
            "checkpoint.load_ignore_keys to start the decay's own clock"
        ]
    return []


def _special_token_ids(tokenizer: str) -> dict[str, int | None] | None:
    """The run's tokenizer's bos/eos/pad/unk ids for the checkpoints' record (None, with a warning,
    when transformers cannot read it: an export of the run then needs ``--tokenizer``)."""
    from handover.hf_mamba import tokenizer_special_ids

    try:
        return tokenizer_special_ids(tokenizer)
    except ValueError as exc:
        warnings.warn(f"checkpoints will not record the special-token ids: {exc}", stacklevel=2)
        return None


# ----------------------------------------------------------------------------------------------
# The plan


def plan_run(cfg: TrainConfig, world: int, part: int = 0, parts: int = 1) -> RunPlan:
    """Plan a run of ``cfg`` on ``world`` processes: read and check every input, derive every setting.

    ``part`` of ``parts``: the share of each local stream's shard files this process checks (the
    ranks of one node split the work; ``recipes/train.py`` shares the verdicts). Every problem is
    raised at once in one ``ConfigError``; a corrupt checkpoint is a fault (``cli.RunStopped``).
    """
    problems = _batch_problems(cfg, world)
    try:
        check_output_path(cfg.run_dir, "the run folder (run_root/run_name)", overwrite=True)
    except cli.UserError as exc:
        problems.append(str(exc))
    notes: list[str] = []
    precision = "fp32"
    try:
        precision = resolve_precision(cfg)
    except ConfigError as exc:
        problems += exc.problems
    ckpt = cfg.checkpoint
    save_folder = ckpt.save_folder or str(cfg.run_dir / "checkpoints")
    pre_decay_folder = ckpt.pre_decay_folder or join_folder(save_folder, "pre-decay")
    if not ckpt.remote_poll_seconds > 0:
        problems.append(
            f"checkpoint.remote_poll_seconds={ckpt.remote_poll_seconds}: seconds between checks for a "
            "checkpoint's files on the object store; give a positive number (default 30)"
        )

    tokenizer: TokenizerPlan | None = None
    data: DataPlan | None = None
    try:
        info = tokenizer_info(load_tokenizer(cfg.tokenizer))
        tokenizer = TokenizerPlan(cfg.tokenizer, info, _special_token_ids(cfg.tokenizer))
        problems += _vocab_problems(cfg, info.vocab_size)
        streams = phase_streams_of(cfg.data)
        splits = {
            split: plan_split(cfg.data, streams, cfg.tokenizer, info, split)
            for split in (("train", "val") if cfg.eval_interval else ("train",))
        }
        problems += [
            p
            for plan in splits.values()
            for name, index in plan.local_indexes().items()
            for p in shard_file_problems(name, index, part, parts)
        ]
        data = DataPlan(cfg.data.phase, streams, splits["train"], splits.get("val"))
    except ConfigError as exc:
        problems += exc.problems
    except (FileNotFoundError, ValueError) as exc:
        problems.append(str(exc))

    seq_len = data.train.seq_len if data is not None else 0
    schedule = plan_schedule(cfg, world, seq_len)
    problems += schedule.problems
    notes += schedule.notes

    with torch.device("meta"):
        meta_model = MambaLMHeadModel(cfg.model)
    expected = {n: tuple(p.shape) for n, p in meta_model.state_dict().items()}
    load, load_problems, load_notes = _plan_load(cfg, save_folder, expected, schedule)
    problems += load_problems
    notes += load_notes

    init_from = None
    if cfg.init_from is not None:
        try:
            vocab = tokenizer.info.vocab_size if tokenizer is not None else None
            init_from = plan_init_from(
                cfg.init_from,
                meta_model,
                model_cfg=cfg.model,
                tokenizer=cfg.tokenizer,
                n_tokens=vocab,
                data=cfg.data,
                load_path=cfg.checkpoint.load_path,
                per_rank=cfg.fsdp.parallelism(world) is not None and cfg.fsdp.version == 2,
            )
        except ConfigError as exc:
            problems += exc.problems
        except cli.USER_ERRORS as exc:
            problems.append(str(exc) or type(exc).__name__)
    if problems:
        raise ConfigError(*problems)
    assert tokenizer is not None and data is not None
    geometry = BatchGeometry(
        world,
        cfg.global_train_batch_size,
        cfg.global_train_batch_size // world,
        cfg.device_train_microbatch_size,
        seq_len,
        schedule.geometry.ramp,
    )
    return RunPlan(
        cfg=cfg,
        resolved=resolved_dict(cfg),
        geometry=geometry,
        precision=precision,
        parallelism=cfg.fsdp.parallelism(world),
        tokenizer=tokenizer,
        data=data,
        schedule=schedule,
        save_folder=save_folder,
        pre_decay_folder=pre_decay_folder,
        load=load,
        init_from=init_from,
        notes=tuple(notes),
    )
