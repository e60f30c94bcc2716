"""A release that continues exactly: AdamW's moments and the run's position, beside an HF export.

``python -m recipes.export RUN --to hf --with-training-state`` writes, next to the HF model:

- ``optimizer.safetensors``: for every parameter (HF names), ``exp_avg.<name>``,
  ``exp_avg_sq.<name>`` and ``step.<name>`` (a 0-d float32 tensor, as torch's AdamW keeps it);
  written tensor by tensor (``StreamingSafetensorsWriter``): the header is computed from the
  checkpoint's metadata, then each moment is read, written and dropped, so the optimizer is
  never whole in memory (monolithic checkpoints are memory-mapped, sharded ones read one entry
  at a time with ``torch.distributed.checkpoint``).
- ``training_state.json``: what the run had done (tokens, samples, batches), the learning rate
  of its next batch and its schedule, the optimizer's hyperparameters and groups, the data mix
  and Streaming's position in it (the ``dataset_state`` a Composer checkpoint holds), the
  tokenizer and the resolved recipe (recorded in every checkpoint by ``TrainingRecord``).
- ``README.md``: a model card saying what the checkpoint is (pre-decay, final or intermediate,
  tokens seen, lr, schedule) and the command that continues it.

``init_from`` of such a release (``handover/init_from.py``) restores the moments and step counts
(``RestoreTrainingState``: no lr re-warmup needed) and, with ``init_from.data_position: true``,
Streaming's position in the same mix. The decay it then runs equals the decay started from the
Composer checkpoint with ``checkpoint.load_path`` (tests/test_training_state.py).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch import Tensor

from handover.hf_mamba import HF_EMBEDDING, OUR_EMBEDDING
from handover.reader import TRUST_HINT, read_composer, safe_reader_and_planner, verify
from handover.tensor_files import PendingTensor, drop_mapped_pages, write_safetensors

TRAINING_STATE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_CARD = "README.md"
RECORD = "TrainingRecord"  # the callback's name in a Composer checkpoint's state/callbacks
FORMAT_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq", "step")
FQN_PREFIX = "model."  # ComposerMambaLM holds the network as its child ``model``
DCP_OPTIM_PREFIX = "state.optimizers."


class TrainingRecord(Callback):
    """Stores the run's resolved recipe in every Composer checkpoint (``state/callbacks``).

    A checkpoint then says, on its own (monolithic or sharded, local or remote), which schedule,
    data mix and tokenizer produced it: what ``--with-training-state`` writes into a release.
    """

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe_json = json.dumps(recipe, sort_keys=True, default=str)

    def state_dict(self) -> dict[str, Any]:
        return {"recipe_json": self.recipe_json}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep this run's own recipe: a resumed or re-planned run records what it trains now."""

    def fit_start(self, state: State, logger: Logger) -> None:
        """Nothing to do at run time: the record is only read back from checkpoints."""


def hf_name(ours: str) -> str:
    return HF_EMBEDDING if ours == OUR_EMBEDDING else ours


def our_name(hf: str) -> str:
    return OUR_EMBEDDING if hf == HF_EMBEDDING else hf


# ----------------------------------------------------------------------------------------------
# Reading a Composer checkpoint's training state, one tensor at a time


@dataclass
class CheckpointTrainingState:
    """What a Composer checkpoint knows beyond its weights; the moments are read on demand."""

    timestamp: dict[str, int]  # token, sample, batch, epoch, ...
    dataset_state: dict[str, Any] | None
    param_groups: list[dict[str, Any]]  # hyperparameters, with the FQNs under "params"
    lrs: list[float]  # the lr of each group's next batch
    recipe: dict[str, Any] | None  # the resolved recipe (TrainingRecord), when recorded
    moments: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]  # our name -> kind -> (dtype, shape)
    read_moment: Callable[[str, str], Tensor] = field(repr=False)  # (our name, kind) -> tensor
    release: Callable[[Tensor], None] = field(default=lambda tensor: None, repr=False)  # after use


def _timestamp_dict(value: Any) -> dict[str, int]:
    """Composer stores ``{"Timestamp": {"token": Time or int, ...}}``; plain ints out."""
    inner = value.get("Timestamp", value) if isinstance(value, dict) else value
    out = {}
    for key in ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch"):
        if key in inner:
            v = inner[key]
            out[key] = int(getattr(v, "value", v))
    return out


def _optimizer_name(optimizers: dict[str, Any], label: str) -> str:
    if len(optimizers) != 1 or "AdamW" not in optimizers:
        raise ValueError(
            f"{label}: holds optimizer(s) {sorted(optimizers)}; only AdamW's state can be released"
        )
    return "AdamW"


@contextlib.contextmanager
def _monolithic(path: Path, label: str, trust: bool, opt_in: str) -> Iterator[CheckpointTrainingState]:
    # Verified, memory-mapped (tensors stay on disk until read) and read as data unless trusted.
    ckpt = read_composer(path, trust=trust, label=label, opt_in=opt_in)
    state = ckpt.get("state", {}) if isinstance(ckpt, dict) else {}
    optimizers = state.get("optimizers") or {}
    if not optimizers:
        raise ValueError(
            f"{label}: has no optimizer state (a weights-only checkpoint); export it without --with-training-state"
        )
    optim = optimizers[_optimizer_name(optimizers, label)]
    moments = {
        fqn.removeprefix(FQN_PREFIX): {k: (v.dtype, tuple(v.shape)) for k, v in entry.items() if k in MOMENTS}
        for fqn, entry in optim["state"].items()
    }
    schedulers = state.get("schedulers") or {}
    record = (state.get("callbacks") or {}).get(RECORD)
    lrs = [float(g["lr"]) for g in optim["param_groups"]]

    def read(name: str, kind: str) -> Tensor:
        value = optim["state"][FQN_PREFIX + name][kind]
        return value.float() if kind == "step" else value

    del schedulers
    yield CheckpointTrainingState(
        timestamp=_timestamp_dict(state.get("timestamp", {})),
        dataset_state=state.get("dataset_state", {}).get("train") if state.get("dataset_state") else None,
        param_groups=[dict(g) for g in optim["param_groups"]],
        lrs=lrs,
        recipe=json.loads(record["recipe_json"]) if record else None,
        moments=moments,
        read_moment=read,
        release=drop_mapped_pages,
    )
    del ckpt


@contextlib.contextmanager
def _sharded(path: Path, label: str, trust: bool, opt_in: str) -> Iterator[CheckpointTrainingState]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    verify(path, label)
    # Read as data (weights_only unpickling of .metadata and non-tensor entries) unless trusted.
    reader, planner = (
        (dcp.FileSystemReader(str(path)), None) if trust else safe_reader_and_planner(path, label, opt_in)
    )
    metadata = reader.read_metadata().state_dict_metadata
    optim_keys = [k for k in metadata if k.startswith(DCP_OPTIM_PREFIX)]
    names = {k[len(DCP_OPTIM_PREFIX) :].split(".", 1)[0] for k in optim_keys}
    if not names:
        raise ValueError(
            f"{label}: has no optimizer state (a weights-only checkpoint); export it without --with-training-state"
        )
    prefix = f"{DCP_OPTIM_PREFIX}{_optimizer_name(dict.fromkeys(names), label)}."

    def load(keys: dict[str, Any]) -> dict[str, Any]:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming ... a single process": exactly the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(keys, storage_reader=reader, planner=planner, no_dist=True)
        return keys

    moments: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for key, meta in metadata.items():
        if key.startswith(prefix + "state.") and isinstance(meta, TensorStorageMetadata):
            fqn, kind = key[len(prefix + "state.") :].rsplit(".", 1)
            if kind in MOMENTS:
                moments.setdefault(fqn.removeprefix(FQN_PREFIX), {})[kind] = (
                    meta.properties.dtype,
                    tuple(meta.size),
                )
    plain = {k: "" for k in metadata if not isinstance(metadata[k], TensorStorageMetadata)}
    wanted = {
        k: v
        for k, v in plain.items()
        if k.startswith(
            (prefix + "param_groups", "state.timestamp", "state.dataset_state", f"state.callbacks.{RECORD}.")
        )
    }
    values = load(wanted)
    groups = _param_groups_from_flat(values, prefix + "param_groups")
    record = values.get(f"state.callbacks.{RECORD}.recipe_json")

    def read(name: str, kind: str) -> Tensor:
        key = f"{prefix}state.{FQN_PREFIX}{name}.{kind}"
        dtype, shape = moments[name][kind]
        value = load({key: torch.empty(shape, dtype=dtype)})[key]
        return value.float() if kind == "step" else value

    timestamp = {k.rsplit(".", 1)[-1]: v for k, v in values.items() if k.startswith("state.timestamp.")}
    dataset = {
        k.removeprefix("state.dataset_state.train."): v
        for k, v in values.items()
        if k.startswith("state.dataset_state.train.")
    }
    yield CheckpointTrainingState(
        timestamp=_timestamp_dict(timestamp),
        dataset_state=dataset or None,
        param_groups=groups,
        lrs=[float(g["lr"]) for g in groups],
        recipe=json.loads(record) if record else None,
        moments=moments,
        read_moment=read,
    )


def _param_groups_from_flat(values: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """DCP flattens ``param_groups`` (a list of dicts) into ``prefix.<i>.<key>`` entries."""
    groups: dict[int, dict[str, Any]] = {}
    for key, value in values.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            groups.setdefault(int(index), {})[name] = value
    if not groups and prefix in values:
        return [dict(g) for g in values[prefix]]
    return [groups[i] for i in sorted(groups)]


@contextlib.contextmanager
def open_checkpoint_state(
    path: Path, label: str, trust: bool = False, opt_in: str = TRUST_HINT
) -> Iterator[CheckpointTrainingState]:
    """The training state of a local Composer checkpoint (a ``.pt`` file or a sharded folder), read
    as data unless ``trust`` (see handover/reader.py)."""
    if path.is_dir() and (path / ".metadata").is_file():
        with _sharded(path, label, trust, opt_in) as found:
            yield found
    elif path.is_file():
        with _monolithic(path, label, trust, opt_in) as found:
            yield found
    else:
        raise ValueError(
            f"{label}: --with-training-state needs a Composer checkpoint of this repository (a .pt file, a "
            "sharded folder or a run folder); an HF or mamba_ssm directory has no optimizer state"
        )


# ----------------------------------------------------------------------------------------------
# What the checkpoint is, in words


def checkpoint_kind(recipe: dict[str, Any], timestamp: dict[str, int], source: str) -> str:
    """``pre-decay`` (where the recipe's stable phase ends), ``final`` (at max_duration) or ``intermediate``.

    Evaluated with the recipe's own scheduler, as the run did; without a recipe, from the file
    name ``PreDecayCheckpoint`` gives (``pre-decay-baN.pt``, ``pre-decay/``).
    """
    from types import SimpleNamespace

    from composer.core import Time, Timestamp

    from callbacks import registry
    from callbacks.schedulers import PhasedScheduler

    if recipe.get("scheduler") and recipe.get("max_duration"):
        try:
            end = Time.from_timestring(str(recipe["max_duration"]))
            args = dict(recipe["scheduler"])
            scheduler = registry.schedulers.build(args.pop("name"), args, where="scheduler")
            stamp = Timestamp(
                **{k: v for k, v in timestamp.items() if k in ("epoch", "batch", "sample", "token")}
            )
            now = SimpleNamespace(max_duration=end, timestamp=stamp, dataloader_len=None)
            if isinstance(scheduler, PhasedScheduler):
                stable_end = scheduler.stable_end(now)
                if stable_end < end and stamp.get(stable_end.unit) == stable_end:
                    return "pre-decay"
            if stamp.get(end.unit) >= end:
                return "final"
            return "intermediate"
        except (ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"{source}: cannot place the checkpoint in its schedule ({exc})", stacklevel=2)
    name = source.rstrip("/")
    return "pre-decay" if Path(name).name.startswith("pre-decay") or "/pre-decay/" in name else "intermediate"


def describe(state: CheckpointTrainingState, source: str) -> dict[str, Any]:
    """``training_state.json``'s content (without the optimizer's parameter lists)."""
    ts = state.timestamp
    recipe = state.recipe or {}
    kind = checkpoint_kind(recipe, ts, source)
    data = recipe.get("data", {})
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "checkpoint": kind,
        "tokens_seen": ts.get("token"),
        "samples_seen": ts.get("sample"),
        "batches_seen": ts.get("batch"),
        "epoch": ts.get("epoch"),
        "lr": state.lrs[0] if state.lrs else None,
        "lrs": state.lrs,
        "peak_lr": recipe.get("optimizer", {}).get("lr"),
        "schedule": recipe.get("scheduler"),
        "max_duration": recipe.get("max_duration"),
        "data": {
            "mixture": data.get("mixture"),
            "phase": data.get("phase"),
            "dataset_state": state.dataset_state,
        },
        "tokenizer": recipe.get("tokenizer"),
        "recipe": recipe or None,
    }


def _model_card(info: dict[str, Any], out: str) -> str:
    kind = info["checkpoint"]
    what = {
        "pre-decay": "the end of the stable phase of a warmup-stable-decay run: the branch point for "
        "your own decay (Hu et al. 2024; Hägele et al. 2024)",
        "final": "the end of training",
        "intermediate": "a checkpoint taken during training",
    }[kind]
    schedule = info.get("schedule") or {}
    sched_text = ", ".join(f"{k}={v}" for k, v in schedule.items()) if schedule else "not recorded"
    decay_cmd = f"python recipes/train.py yamls/tiny/decay.yaml init_from.path={out}   # a decay_phase recipe of yours"
    continue_cmd = f"python recipes/train.py RECIPE.yaml init_from.path={out} init_from.data_position=true scheduler.t_warmup=0ba"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mamba, mamba-recipes]",
        "---",
        "",
        f"# {Path(str(info['source']).rstrip('/')).name} ({kind})",
        "",
        f"A Mamba language model trained with mamba-recipes: {what}.",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | {kind} |",
        f"| tokens seen | {info['tokens_seen']} |",
        f"| batches seen | {info['batches_seen']} |",
        f"| learning rate of the next batch | {info['lr']} |",
        f"| peak learning rate | {info['peak_lr']} |",
        f"| schedule | {sched_text} |",
        f"| max_duration | {info['max_duration']} |",
        f"| data | {info['data']['mixture']} (phase {info['data']['phase']}) |",
        f"| tokenizer | {info['tokenizer']} |",
        "",
        "`model.safetensors` loads with `transformers.AutoModelForCausalLM`. Beside it,",
        f"`{OPTIMIZER_FILE}` holds AdamW's state (`exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`,",
        f"HF parameter names) and `{TRAINING_STATE}` the run's position (tokens, lr, schedule, the data",
        "mix and Streaming's place in it, the recipe). `init_from` restores both: the run continues",
        "with the moments it had, without a learning-rate re-warm-up.",
        "",
        "Continue it with [mamba-recipes](https://github.com/):",
        "",
        "```bash",
        decay_cmd if kind == "pre-decay" else continue_cmd,
        "```",
        "",
    ]
    if kind == "pre-decay":
        lines += [
            "or continue its stable phase in the same data order (RECIPE.yaml: the recipe in",
            f"`{TRAINING_STATE}`):",
            "",
            "```bash",
            continue_cmd,
            "```",
            "",
        ]
    return "\n".join(lines)


def write_training_state(
    checkpoint: Path, label: str, out_dir: Path, out_name: str, trust: bool = False
) -> dict[str, Any]:
    """Write ``optimizer.safetensors``, ``training_state.json`` and ``README.md`` into ``out_dir``.

    ``checkpoint`` is a local Composer checkpoint (``.pt`` or sharded folder); ``label`` names it in
    messages and in the files; ``out_name`` is where the release will live (for the model card).
    """
    with open_checkpoint_state(checkpoint, label, trust) as state:
        names = sorted(state.moments)
        incomplete = [n for n in names if set(state.moments[n]) != set(MOMENTS)]
        if incomplete:
            raise ValueError(
                f"{label}: AdamW state without {MOMENTS} for {incomplete[:3]} (not AdamW's layout?)"
            )
        pending = [
            PendingTensor(
                f"{kind}.{hf_name(name)}",
                torch.float32 if kind == "step" else state.moments[name][kind][0],
                () if kind == "step" else state.moments[name][kind][1],
                lambda name=name, kind=kind: state.read_moment(name, kind).reshape(
                    () if kind == "step" else state.moments[name][kind][1]
                ),
                state.release,
            )
            for name in names
            for kind in MOMENTS
        ]
        info = describe(state, label)
        groups = []
        for group in state.param_groups:
            hyper = {
                k: v
                for k, v in group.items()
                if k != "params" and isinstance(v, (int, float, str, bool, list, tuple, type(None)))
            }
            params = [hf_name(str(p).removeprefix(FQN_PREFIX)) for p in group.get("params", [])]
            groups.append({**hyper, "params": params})
        info["optimizer"] = {"name": "AdamW", "param_groups": groups}
        write_safetensors(out_dir / OPTIMIZER_FILE, pending, {"format": "pt", "optimizer": "AdamW"})
    (out_dir / TRAINING_STATE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    (out_dir / MODEL_CARD).write_text(_model_card(info, out_name))
    return info


# ----------------------------------------------------------------------------------------------
# A release's training state, read back (init_from)


@dataclass
class ReleasedTrainingState:
    """``training_state.json`` of a release and its AdamW state (our names, CPU tensors)."""

    info: dict[str, Any]
    moments: dict[str, dict[str, Tensor]]  # our name -> exp_avg / exp_avg_sq / step

    @property
    def tokens_seen(self) -> int | None:
        return self.info.get("tokens_seen")


def read_released_state(directory: Path, label: str) -> ReleasedTrainingState | None:
    """The training state beside an HF export, or None when it has none (a weights-only release)."""
    state_file = directory / TRAINING_STATE
    if not state_file.is_file():
        return None
    try:
        info = json.loads(state_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label}/{TRAINING_STATE}: not valid JSON ({exc})") from exc
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{label}/{TRAINING_STATE}: format_version={info.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    optimizer = directory / OPTIMIZER_FILE
    if not optimizer.is_file():
        raise ValueError(f"{label}: {TRAINING_STATE} without {OPTIMIZER_FILE}: the release is incomplete")
    from safetensors import safe_open

    moments: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(optimizer), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            kind, name = key.split(".", 1)
            if kind not in MOMENTS:
                raise ValueError(f"{label}/{OPTIMIZER_FILE}: unexpected entry {key!r}")
            moments.setdefault(our_name(name), {})[kind] = f.get_tensor(key)
    return ReleasedTrainingState(info, moments)


def fetch_released_state(path: str) -> ReleasedTrainingState | None:
    """``read_released_state`` of a local directory or an object-store folder (only its two files are
    downloaded); None when ``path`` is not a release with a training state."""
    from handover.weights import download, is_uri, remote_exists

    if not is_uri(path):
        local = Path(path)
        return read_released_state(local, path) if local.is_dir() else None
    uri = path.rstrip("/")
    if not remote_exists(f"{uri}/{TRAINING_STATE}"):
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="release-state-") as tmp:
        for name in (TRAINING_STATE, OPTIMIZER_FILE):
            if remote_exists(f"{uri}/{name}"):
                download(f"{uri}/{name}", Path(tmp) / name)
        return read_released_state(Path(tmp), uri)


def source_progress(released: ReleasedTrainingState | None, tokens_trained: int | None) -> dict[str, Any]:
    """Tokens (and batches) the init_from source had trained: from its training state, else the
    token count the checkpoint reader already took from a Composer checkpoint's timestamp (the
    file is not read again); ``{}`` when unknown (a plain HF release)."""
    if released is not None:
        return {k: released.info.get(k) for k in ("tokens_seen", "batches_seen", "checkpoint")}
    return {} if tokens_trained is None else {"tokens_seen": tokens_trained}


def check_moments(moments: dict[str, dict[str, Tensor]], params: dict[str, Tensor], label: str) -> None:
    """Every parameter has its three entries, each moment shaped like it; ValueError naming each problem."""
    problems = []
    for name, param in params.items():
        entry = moments.get(name)
        if entry is None or set(entry) != set(MOMENTS):
            problems.append(f"{hf_name(name)}: no complete AdamW state")
            continue
        for kind in ("exp_avg", "exp_avg_sq"):
            if tuple(entry[kind].shape) != tuple(param.shape):
                problems.append(
                    f"{kind}.{hf_name(name)}: {tuple(entry[kind].shape)} vs parameter {tuple(param.shape)}"
                )
    extra = sorted(set(moments) - set(params))
    if extra:
        problems.append(f"state for parameters this model lacks: {[hf_name(n) for n in extra[:5]]}")
    if problems:
        raise ValueError(f"{label}/{OPTIMIZER_FILE} does not fit this model: " + "; ".join(problems[:8]))


class RestoreTrainingState(Callback):
    """At fit start, give AdamW the release's moments and step counts, and optionally Streaming's position.

    Runs after the optimizer exists and before the first batch. Under FSDP the full tensors are
    handed to ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict``, which shards
    them as it shards the parameters; on one process it fills ``optimizer.state`` the same way.
    """

    def __init__(self, released: ReleasedTrainingState | None, dataset_state: dict[str, Any] | None) -> None:
        self.released = released
        self.dataset_state = dataset_state

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.released is not None:
            self._restore_moments(state)
            self.released = None  # the tensors are the optimizer's now
        if self.dataset_state is not None:
            dataset = state._dataset_of(state.train_dataloader)
            assert hasattr(dataset, "load_state_dict"), type(dataset)  # checked by apply_init_from
            dataset.load_state_dict(dict(self.dataset_state))
            state.dataset_resumption["train"] = True  # as Composer's own load marks it
            self.dataset_state = None

    def _restore_moments(self, state: State) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.released is not None
        optimizer = state.optimizers[0]
        names = {id(p): n for n, p in state.model.named_parameters()}
        osd_state = {}
        groups = []
        for group in optimizer.param_groups:
            fqns = [names[id(p)] for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": fqns})
            for fqn in fqns:
                entry = self.released.moments[fqn.removeprefix(FQN_PREFIX)]
                osd_state[fqn] = {
                    "exp_avg": entry["exp_avg"],
                    "exp_avg_sq": entry["exp_avg_sq"],
                    "step": entry["step"].to(torch.float32).reshape(()),
                }
        set_optimizer_state_dict(
            state.model,
            optimizer,
            {"state": osd_state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True),
        )
