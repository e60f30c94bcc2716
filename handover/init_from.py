"""``init_from``: start a run's model from any checkpoint, and never silently change its numbers.

The ``init_from`` section of a training recipe initialises the *model* of a new run from a
released or earlier checkpoint (``handover/weights.py`` reads all of them: a run folder, a
Composer checkpoint monolithic or sharded, an HF or mamba_ssm directory, local or on an object
store). The clock, the schedule, the data position and the optimizer start fresh: to continue a
run of this repository *with* its AdamW state, use ``checkpoint.load_path`` instead.

Three uses (yamls/tiny/continue_hf.yaml, decay_hf.yaml, inheritune.yaml and the README):

- continue the stable phase of a released model at its peak lr;
- a custom decay (``scheduler.name: decay_phase``) from a released pre-decay checkpoint;
- Inheritune (Sanyal et al. 2024): the first n blocks (``num_layers``), or a listed set
  (``layers``), with the embedding, final norm and head as chosen.

AdamW's moments. A released checkpoint carries no optimizer state, so the run starts with
``exp_avg = exp_avg_sq = 0``. AdamW's bias correction then makes the first update
``lr * g / |g|``: every coordinate moves by the full lr, whatever its gradient's scale, where a
trained optimizer moves most coordinates far less. ``lr_rewarmup`` (default 20 batches; the
Mambaoutai recipes use 200, a tenth of its original 2000-step warmup) ramps the lr linearly from
0 on top of the schedule while the moments fill: batch 0 only estimates them (lr 0). Measured
with benchmarks/bench_rewarmup.py on the demo corpus (README, "Continue pre-training, or run
your own decay"): without it the decay's loss first rises by 0.07 nats and ends 0.11 nats worse
than with the checkpoint's AdamW state; with it the loss never rises and ends 0.06 behind.

A release with its training state (``recipes.export --with-training-state``: AdamW's moments
and step counts, ``training_state.json``) continues exactly: with ``init_from.training_state``
(default on) the moments are restored at fit start and no re-warmup is applied; with
``init_from.data_position: true`` Streaming's position in the same mix is restored too. Only a
whole-model copy restores moments (a block selection starts fresh, with the re-warmup). Every
run started with ``init_from`` records the tokens its source had seen (``run.json`` key
``init_from_source``, the ``init_from/tokens_seen`` hyperparameter), so ``eval.report`` draws it
from there (handover/training_state.py).

Where the weights are loaded. ``apply_init_from`` runs right after the model is built and
before the optimizer exists; every rank reads the checkpoint lazily there (memory-mapped, or a
sharded one described by its metadata) and checks it. On one process the model is given the
read tensors themselves. Under FSDP2 (``LoadShards``) the copy waits until Composer has sharded
the model (``Event.BEFORE_LOAD``): each rank then copies only its own rows of each tensor (from
the memory-mapped file, or through ``torch.distributed.checkpoint`` from a sharded one), so no
rank materialises the whole model, whether it was built on the CPU or on the meta device (GPUs).
A remote sharded source is the exception: it is downloaded and read whole by every rank. With
FSDP1 every rank loads the full model before wrapping.

Checks, all before any compute: each loaded tensor's shape (naming the parameter, both shapes
and the fix), the tokenizer against the checkpoint's vocabulary, the kind of every selected
block (SSM or attention), and every model setting that changes what a block computes (e.g.
``norm_epsilon``, ``rotary_emb_dim``): a mismatch names the ``model.`` key and the value to set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from omegaconf import MISSING
from torch import Tensor

from common.config import report
from handover.integrity import compare_shapes
from handover.reader import assign_weights, copy_into_shards, local_part, read_sharded_into
from handover.weights import ModelWeights, read_weights
from models.config import MambaConfig

if TYPE_CHECKING:
    from data.loader import DataConfig
    from models.composer_model import ComposerMambaLM

log = logging.getLogger(__name__)

LAYER_PREFIX = "backbone.layers."


@dataclass
class InitFromConfig:
    """Initialise the model of a new run from a checkpoint (weights only; fresh optimizer and clock)."""

    path: str = (
        MISSING  # run folder, Composer checkpoint (.pt or sharded folder), HF or mamba_ssm dir; local or URI
    )
    num_layers: int = 0  # > 0: the checkpoint's first num_layers blocks (Inheritune); 0: see `layers`
    layers: list[int] = field(default_factory=list)  # the checkpoint's blocks, in order; [] = all of them
    embedding: bool = True  # copy backbone.embedding (False: fresh init)
    final_norm: bool = True  # copy backbone.norm_f
    lm_head: bool = True  # copy lm_head (a tied head follows the embedding)
    # A Composer checkpoint is read as data (weights_only=True); true reads it with full pickle,
    # which can run code: only for a checkpoint whose origin you trust.
    trust: bool = False
    # Ramp the lr from 0 over the run's first batches (or tokens) while AdamW's fresh moments fill.
    lr_rewarmup: str = "20ba"
    # A release with its training state: restore AdamW's moments (then no re-warmup is applied).
    training_state: bool = True
    # ... and continue Streaming's position in the same data mix (needs the training state).
    data_position: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.path:
            problems.append("init_from.path is empty: set it to a checkpoint, run folder or model directory")
        if self.num_layers < 0:
            problems.append(f"init_from.num_layers={self.num_layers} must be >= 0")
        if self.num_layers and self.layers:
            problems.append(
                f"init_from.num_layers={self.num_layers} and init_from.layers={self.layers} are both set; "
                "use one (num_layers: the first n blocks; layers: an explicit list)"
            )
        if any(i < 0 for i in self.layers):
            problems.append(f"init_from.layers={self.layers} has negative block indices")
        try:
            parse_rewarmup(self.lr_rewarmup)
        except ValueError as exc:
            problems.append(str(exc))
        report(problems)

    def source_layers(self, checkpoint_layers: int) -> list[int]:
        """The checkpoint block copied into each block of the new model, in order."""
        if self.layers:
            return list(self.layers)
        if self.num_layers:
            return list(range(self.num_layers))
        return list(range(checkpoint_layers))


def parse_rewarmup(value: str) -> Time:
    try:
        t = Time.from_timestring(value)
    except ValueError as exc:
        raise ValueError(f"init_from.lr_rewarmup={value!r} is not a time such as '20ba' or '1e7tok'") from exc
    if t.unit not in (TimeUnit.BATCH, TimeUnit.TOKEN, TimeUnit.SAMPLE) or t.value < 0:
        raise ValueError(
            f"init_from.lr_rewarmup={value!r} must be a length in ba, tok or sp (e.g. '20ba', '0ba')"
        )
    return t


# ----------------------------------------------------------------------------------------------
# What is copied where, and the checks


def inherited_config(reference: MambaConfig, layers: list[int]) -> MambaConfig:
    """The config of a model made of ``reference``'s blocks ``layers`` (Inheritune's smaller model)."""
    from dataclasses import replace

    attn = [j for j, i in enumerate(layers) if i in reference.attn_layer_idx]
    return replace(reference, n_layer=len(layers), attn_layer_idx=attn)


# Settings that change what a block computes (not only how it is initialised or scheduled).
_COMPUTE_FIELDS = ("d_model", "d_intermediate", "rms_norm", "norm_epsilon", "residual_in_fp32")
_SSM_FIELDS = (
    "layer",
    "d_state",
    "d_conv",
    "expand",
    "conv_bias",
    "bias",
    "headdim",
    "ngroups",
    "gated_norm_eps",
    "gated_norm_per_group",
    "b_c_dt_rms",
    "b_c_dt_rms_eps",
)
_ATTN_FIELDS = ("num_heads", "rotary_emb_dim", "rotary_base", "qkv_proj_bias", "out_proj_bias")


def _setting_differences(model: MambaConfig, ckpt: MambaConfig, has_attn: bool) -> list[str]:
    diffs = [
        f"model.{name}={getattr(ckpt, name)!r}"
        for name in _COMPUTE_FIELDS
        if getattr(model, name) != getattr(ckpt, name)
    ]
    mamba2_only = ("headdim", "ngroups", "gated_norm_eps", "gated_norm_per_group")
    ssm_fields = [f for f in _SSM_FIELDS if ckpt.ssm.layer == "mamba2" or f not in mamba2_only]
    diffs += [
        f"model.ssm.{name}={getattr(ckpt.ssm, name)!r}"
        for name in ssm_fields
        if getattr(model.ssm, name) != getattr(ckpt.ssm, name)
    ]
    if ckpt.ssm.layer == "mamba1" and model.dt_rank != ckpt.dt_rank:
        diffs.append(f"model.ssm.dt_rank={ckpt.dt_rank}")
    if has_attn:
        diffs += [
            f"model.attn.{name}={getattr(ckpt.attn, name)!r}"
            for name in _ATTN_FIELDS
            if getattr(model.attn, name) != getattr(ckpt.attn, name)
        ]
        if model.attn_num_heads_kv != ckpt.attn_num_heads_kv:
            diffs.append(f"model.attn.num_heads_kv={ckpt.attn_num_heads_kv}")
        if model.attn_head_dim != ckpt.attn_head_dim:
            diffs.append(f"model.attn.head_dim={ckpt.attn_head_dim}")
    return diffs


def select_weights(
    init: InitFromConfig,
    model_cfg: MambaConfig,
    ckpt: ModelWeights,
    model_sd: dict[str, Tensor],
    tokenizer: str = "",
    n_tokens: int | None = None,
) -> dict[str, Tensor]:
    """The tensors to copy into a model with state dict ``model_sd`` (our names), checked.

    ``n_tokens``: the size of the run's ``tokenizer`` (None: not known, not checked). Raises
    ``ValueError`` naming every problem and its fix before anything is copied.
    """
    src_cfg = ckpt.config
    where = f"init_from.path={init.path}"
    layers = init.source_layers(src_cfg.n_layer)
    problems: list[str] = []
    if not init.layers and not init.num_layers and model_cfg.n_layer != src_cfg.n_layer:
        problems.append(
            f"the checkpoint has {src_cfg.n_layer} blocks and model.n_layer={model_cfg.n_layer}: set "
            f"model.n_layer={src_cfg.n_layer}, or choose blocks with init_from.num_layers / init_from.layers"
        )
    elif len(layers) != model_cfg.n_layer:
        problems.append(
            f"init_from selects {len(layers)} blocks {layers} but model.n_layer={model_cfg.n_layer}: "
            f"set model.n_layer={len(layers)}"
        )
    bad = [i for i in layers if i >= src_cfg.n_layer]
    if bad:
        problems.append(
            f"init_from selects blocks {bad}, but the checkpoint has blocks 0..{src_cfg.n_layer - 1}"
        )
    if not problems:
        want_attn = [j for j, i in enumerate(layers) if i in src_cfg.attn_layer_idx]
        if model_cfg.attn_layer_idx != want_attn:
            problems.append(
                f"the selected blocks are attention at positions {want_attn} of the new model, but "
                f"model.attn_layer_idx={model_cfg.attn_layer_idx}: set model.attn_layer_idx={want_attn}"
            )
    src_vocab = ckpt.state_dict["backbone.embedding.weight"].shape[0]
    if n_tokens is not None and n_tokens > src_vocab and (init.embedding or init.lm_head):
        problems.append(
            f"the tokenizer {tokenizer} has {n_tokens} tokens, more than the checkpoint's vocabulary of "
            f"{src_vocab} rows: token ids past {src_vocab - 1} have no embedding. Use the checkpoint's "
            "tokenizer (or one with at most that many tokens)"
        )
    if not problems and model_cfg.tie_embeddings and not src_cfg.tie_embeddings and init.lm_head:
        problems.append(
            "the checkpoint's head is untied from its embedding but model.tie_embeddings=true: "
            "set model.tie_embeddings=false (or init_from.lm_head=false)"
        )
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))

    mapping: dict[str, str] = {}  # model key -> checkpoint key
    for new, old in enumerate(layers):
        for key in ckpt.state_dict:
            if key.startswith(f"{LAYER_PREFIX}{old}."):
                mapping[f"{LAYER_PREFIX}{new}." + key[len(f"{LAYER_PREFIX}{old}.") :]] = key
    if init.embedding:
        mapping["backbone.embedding.weight"] = "backbone.embedding.weight"
    if init.final_norm:
        for key in ckpt.state_dict:
            if key.startswith("backbone.norm_f."):
                mapping[key] = key
    if init.lm_head and not model_cfg.tie_embeddings:
        mapping["lm_head.weight"] = (
            "lm_head.weight" if not src_cfg.tie_embeddings else "backbone.embedding.weight"
        )
    if model_cfg.tie_embeddings and init.lm_head and not init.embedding:
        mapping["backbone.embedding.weight"] = "backbone.embedding.weight"  # the tied head is this tensor

    selected = {new: tuple(ckpt.state_dict[old].shape) for new, old in mapping.items()}
    # A block part the checkpoint lacks is missing; a part the selection leaves out keeps its init.
    wanted = {k: tuple(v.shape) for k, v in model_sd.items() if k in mapping or k.startswith(LAYER_PREFIX)}
    shapes = compare_shapes(selected, wanted)
    shape_errors = [
        f"{new}: in the checkpoint ({mapping[new]}) but not in this model" for new in shapes.only_found
    ]
    shape_errors += [f"{k}: checkpoint {selected[k]} vs model {wanted[k]}" for k in shapes.mismatched]
    missing = shapes.only_expected
    diffs = _setting_differences(model_cfg, src_cfg, has_attn=bool(model_cfg.attn_layer_idx))
    if src_vocab != model_sd["backbone.embedding.weight"].shape[0]:
        diffs.append(
            f"model.vocab_size={src_cfg.vocab_size} (model.pad_vocab_size_multiple={src_cfg.pad_vocab_size_multiple})"
        )
    if shape_errors or missing or diffs:
        fix = f" Fix: set {', '.join(diffs)}." if diffs else ""
        raise ValueError(
            f"{where} does not fit this model: "
            + "; ".join(shape_errors + [f"{k}: not in the checkpoint" for k in missing])
            + ("; " if shape_errors or missing else "")
            + "the model must compute what the checkpoint was trained to compute."
            + fix
        )
    return {new: ckpt.state_dict[old] for new, old in mapping.items()}


# ----------------------------------------------------------------------------------------------
# The lr re-warmup


class LrRewarmup(Callback):
    """Scale the lr by ``t / T`` for the first ``T`` of a run whose optimizer starts without state.

    Applied on top of the schedule: after each scheduler step (``Event.BATCH_END``) and at fit
    start, the lr becomes ``schedule(t) * min(1, t / T)`` with ``t`` the time already trained. It
    must run before ``LRMonitor`` so the logged lr is the one used (``recipes/train.py`` puts it
    first). The value is recomputed from the scheduler every time, so resuming never compounds it.
    """

    def __init__(self, duration: str) -> None:
        self.duration = parse_rewarmup(duration)

    def _factor(self, state: State) -> float:
        if self.duration.value == 0:
            return 1.0
        now = state.timestamp.get(self.duration.unit).value
        return min(1.0, now / self.duration.value)

    def _apply(self, state: State) -> None:
        factor = self._factor(state)
        for scheduler in state.schedulers:
            for group, scheduled in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = scheduled * factor

    def fit_start(self, state: State, logger: Logger) -> None:
        self._apply(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._apply(state)


# ----------------------------------------------------------------------------------------------
# The one call recipes/train.py makes


def load_into(model: torch.nn.Module, weights: dict[str, Tensor]) -> None:
    """Give ``model`` the tensors ``weights`` (a subset of its state dict, checked by ``select_weights``).

    The read tensors become the model's (``assign_weights``): a memory-mapped checkpoint is not copied.
    """
    assign_weights(model, weights)


class LoadShards(Callback):
    """init_from under FSDP2: each rank fills its own shards of the model from the checkpoint.

    Runs at ``Event.BEFORE_LOAD``: Composer has sharded the model (each parameter a ``DTensor``
    holding this rank's rows, initialised by ``param_init_fn`` when built on meta) and has not
    yet loaded a resume checkpoint, which, when there is one, then replaces these weights as it
    replaces any initialisation. A memory-mapped source (a monolithic Composer checkpoint,
    safetensors) is sliced, so only the pages of this rank's rows are read; a local sharded
    source is read with ``torch.distributed.checkpoint``, which reads only the byte ranges
    overlapping this rank's rows. No rank holds the whole model, and no collective is needed.
    """

    def __init__(
        self, model: torch.nn.Module, weights: dict[str, Tensor], ckpt: ModelWeights, message: str
    ) -> None:
        self.model = model  # FSDP2 shards it in place: the same module after Composer wraps it
        self.weights: dict[str, Tensor] | None = weights
        self.ckpt = ckpt
        self.message = message

    def before_load(self, state: State, logger: Logger) -> None:
        if self.weights is None:
            return
        targets = self.model.state_dict(keep_vars=True)  # the parameters themselves (DTensors)
        if self.ckpt.shards is None:
            copy_into_shards({k: targets[k] for k in self.weights}, self.weights, self.ckpt.source)
        else:
            # The checkpoint's key of each selected tensor (``select_weights`` returns the read
            # objects); a tensor selected twice is read once and its rows copied to the second.
            keys = {id(t): k for k, t in self.ckpt.state_dict.items()}
            first: dict[str, str] = {}
            for new, tensor in self.weights.items():
                first.setdefault(self.ckpt.shard_keys[keys[id(tensor)]], new)
            read_sharded_into(
                self.ckpt.shards, {old: targets[new] for old, new in first.items()}, label=self.ckpt.source
            )
            with torch.no_grad():
                for new, tensor in self.weights.items():
                    source = first[self.ckpt.shard_keys[keys[id(tensor)]]]
                    if source != new:
                        local_part(targets[new])[0].copy_(local_part(targets[source])[0])
        self.weights = None  # the mapped tensors are no longer needed
        log.info(self.message)
        if dist.get_global_rank() == 0:
            print(f"[train] {self.message} (each rank its own shards)", flush=True)


def _materialise_if_meta(model: torch.nn.Module, init_fn: Any) -> bool:
    """Give a meta-device model real CPU tensors, initialised; False when it already has them."""
    if not any(p.is_meta for p in model.parameters()):
        return False
    model.to_empty(device="cpu")
    for module in model.modules():
        init_fn(module)
    return True


def _training_state_callbacks(
    data: DataConfig, init: InitFromConfig, params: dict[str, Tensor], tokens_trained: int | None
) -> tuple[list[Callback], dict[str, Any]]:
    """The callbacks that restore a release's training state, and what the run records of its source.

    Every rank decides from the same files, so every rank reaches the same verdict.
    """
    from handover.training_state import (
        RestoreTrainingState,
        check_moments,
        fetch_released_state,
        source_progress,
    )

    released = fetch_released_state(init.path) if init.training_state or init.data_position else None
    record: dict[str, Any] = {"path": init.path, **source_progress(released, tokens_trained)}
    whole = not init.layers and not init.num_layers and init.embedding and init.final_norm and init.lm_head
    dataset_state = None
    if init.data_position:
        if released is None:
            raise ValueError(
                f"init_from.data_position=true but init_from.path={init.path} carries no training state "
                "(export it with recipes.export --with-training-state); set init_from.data_position=false"
            )
        dataset_state = _checked_data_position(data, init, released.info)
    restore = released if released is not None and init.training_state and whole else None
    if restore is not None:
        check_moments(restore.moments, params, init.path)
    if released is not None and init.training_state and not whole:
        print(
            "[train] init_from: the release's AdamW state is not restored: init_from selects blocks or parts "
            f"(moments start fresh, lr_rewarmup={init.lr_rewarmup})",
            flush=True,
        )
    record["moments_restored"] = restore is not None
    record["data_position_restored"] = dataset_state is not None
    callbacks: list[Callback] = []
    if restore is not None or dataset_state is not None:
        callbacks.append(RestoreTrainingState(restore, dataset_state))
    return callbacks, record


def _checked_data_position(cfg: DataConfig, init: InitFromConfig, info: dict[str, Any]) -> dict[str, Any]:
    from data.loader import mix_id
    from data.mixture import load_mixture, phase_streams

    recorded = info.get("data") or {}
    position = recorded.get("dataset_state")
    if not position:
        raise ValueError(
            f"init_from.data_position=true but {init.path}'s training state records no data position; "
            "set init_from.data_position=false"
        )
    overrides = [f"root={cfg.root}"] if cfg.root is not None else []
    streams = phase_streams(load_mixture(cfg.mixture, overrides), cfg.phase, source=cfg.mixture)
    ours = mix_id(cfg, streams, "train")
    if position.get("mix_id") not in (None, ours):
        raise ValueError(
            f"init_from.data_position=true: the release stood in another data mix (data.mixture="
            f"{recorded.get('mixture')}, data.phase={recorded.get('phase')}) than this run reads (data.mixture="
            f"{cfg.mixture}, data.phase={cfg.phase}, or other weights, epoch_size or shuffle_seed); "
            "use the release's mix, or set init_from.data_position=false to start this mix from its first sample"
        )
    return position


class InitFromSource(Callback):
    """Logs what the init_from source had trained (``init_from/tokens_seen``, ...) as hyperparameters."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def fit_start(self, state: State, logger: Logger) -> None:
        logger.log_hyperparameters({f"init_from/{k}": v for k, v in self.record.items()})


@dataclass(frozen=True)
class InitFromPlan:
    """The ``init_from`` source, read and checked against the model: what the build loads."""

    source: str
    format: str
    checkpoint: ModelWeights  # as read (lazily: mapped, or a sharded one described by its metadata)
    weights: dict[str, Tensor]  # model key -> the checkpoint's tensor, checked by ``select_weights``
    record: dict[str, Any]  # run.json's ``init_from_source``: what the source had trained
    callbacks: tuple[Callback, ...]  # restore the release's training state, log the source, re-warm the lr
    per_rank: bool  # FSDP2: each rank copies its own shards once Composer has sharded the model


def plan_init_from(
    init: InitFromConfig,
    model: torch.nn.Module,
    *,
    model_cfg: MambaConfig,
    tokenizer: str,
    n_tokens: int | None,
    data: DataConfig,
    load_path: str | None,
    per_rank: bool,
) -> InitFromPlan:
    """Read ``init``'s checkpoint and check it against ``model`` (the run's model, on the meta
    device: only names and shapes are used) and the tokenizer's ``n_tokens``.

    Every rank reads and checks the checkpoint (path, format, shapes, vocabulary), so a mistake
    stops all of them alike (recipes/train.py shares the verdicts before any collective). It is
    read lazily: memory-mapped, or (``per_rank``: a sharded source under FSDP2) described by its
    metadata alone.
    """
    if load_path:
        raise ValueError(
            f"init_from.path={init.path} and checkpoint.load_path={load_path} are both set: "
            "init_from starts a new run from a model's weights; load_path loads a Composer checkpoint "
            "(weights and optimizer state). Keep one"
        )
    ckpt = read_weights(init.path, trust=init.trust, opt_in="init_from.trust=true", lazy_shards=per_rank)
    weights = select_weights(init, model_cfg, ckpt, model.state_dict(), tokenizer, n_tokens)
    restore, record = _training_state_callbacks(
        data, init, dict(model.named_parameters()), ckpt.tokens_trained
    )
    callbacks: list[Callback] = [*restore, InitFromSource(record)]
    if not record["moments_restored"]:
        callbacks.append(LrRewarmup(init.lr_rewarmup))
    return InitFromPlan(ckpt.source, ckpt.format, ckpt, weights, record, tuple(callbacks), per_rank)


def apply_init_from(plan: InitFromPlan, composer_model: ComposerMambaLM, fsdp_version: int) -> list[Callback]:
    """Load the planned weights into the freshly built model, before the optimizer exists; the
    callbacks that still load (``LoadShards`` under FSDP2), to put first among the run's callbacks
    with ``plan.callbacks``.

    With ``plan.per_rank`` (FSDP2) each rank copies its own rows once Composer has sharded the
    model (``LoadShards``). Otherwise every process with a model off the meta device loads it whole;
    on the meta device under FSDP2 rank 0 alone materialises and loads, and Composer broadcasts.
    """
    model = composer_model.model
    message = f"init_from: {len(plan.weights)} tensors from {plan.source} ({plan.format})"
    if plan.record["moments_restored"] and dist.get_global_rank() == 0:
        print("[train] init_from: AdamW's moments restored from the release; no lr re-warmup", flush=True)
    if plan.per_rank:
        return [LoadShards(model, plan.weights, plan.checkpoint, message)]
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta or fsdp_version == 1 or dist.get_global_rank() == 0:
        _materialise_if_meta(model, model.param_init_fn)
        load_into(model, plan.weights)
        log.info(message)
        if dist.get_global_rank() == 0:
            print(f"[train] {message}", flush=True)
    return []
