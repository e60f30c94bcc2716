"""Read model weights from anywhere a checkpoint lives: one entry point for init_from, export and evaluation.

``read_weights(source)`` returns the model config and a full state dict (our parameter names,
CPU tensors) from any of:

- a run folder of this repository (``{run_root}/{run_name}``): its latest checkpoint,
  ``checkpoints/latest-rank0.pt`` (a symlink Composer keeps to the newest file or folder);
- a Composer checkpoint of this repository, monolithic (``ep0-ba100-rank0.pt``,
  ``pre-decay-ba100.pt``) or sharded (a torch.distributed.checkpoint folder: ``.metadata`` and
  ``__{rank}_0.distcp``, what FSDP runs write with ``fsdp.state_dict_type: sharded``);
- an HF transformers directory (``MambaForCausalLM`` / ``Mamba2ForCausalLM``) or a mamba_ssm
  directory (``config.json`` + ``pytorch_model.bin``): ``read_pretrained``, the one place that tells
  the two apart (their configs: ``handover.hf_mamba``, ``handover.mamba_ssm``);

each local or on an object store (``s3://``, ``gs://``, ``oci://``, ``azure://``), through
Composer's own object-store layer (``composer.utils.maybe_create_object_store_from_uri``, which
honours ``S3_ENDPOINT_URL``): remote sources are downloaded to a temporary folder first.

Which model a Composer checkpoint holds. Checkpoints written by ``recipes/train.py`` carry
their model config in the state of the ``HandoverRecord`` callback (``state/callbacks``), so a
checkpoint alone, monolithic or sharded, local or remote, says what it is. Older checkpoints
fall back to the ``run.json`` of the run folder they sit in (``<run>/checkpoints/<ckpt>``).

A sharded checkpoint is read in one process without a process group: the tensors are sized
from the checkpoint's own metadata and filled by ``torch.distributed.checkpoint.load(...,
no_dist=True)``, which assembles every rank's shards; only the model's entries are read, not
the optimizer's.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.config import config_from_dict
from common.io import read_json_object
from handover.hf_mamba import config_from_hf, hf_config_special_ids, state_dict_from_hf
from handover.mamba_ssm import config_from_mamba_ssm
from handover.reader import (
    TRUST_HINT,
    assign_weights,
    read_composer,
    read_dcp_metadata,
    read_safetensors,
    read_sharded,
    read_torch_weights,
    tokens_trained,
    verify,
)
from handover.record import RECORD
from models.config import MambaConfig
from models.mamba_lm import MambaLMHeadModel

MODEL_PREFIX = "model."  # ComposerMambaLM holds the MambaLMHeadModel as its child ``model``
DCP_MODEL_PREFIX = "state.model.model."
LATEST = "latest-rank0.pt"


@dataclass
class ModelWeights:
    """A model's config and complete state dict (our names; a tied head is left out)."""

    config: MambaConfig
    state_dict: dict[str, Tensor]
    source: str  # what was read, for messages
    format: str  # hf | mamba_ssm | composer | composer-sharded
    tokenizer: str = ""  # the tokenizer a Composer run recorded ("" when unknown)
    # bos/eos/pad/unk ids the run recorded or an HF config states; None when unknown
    special_token_ids: dict[str, int | None] | None = None
    tokens_trained: int | None = None  # a monolithic Composer checkpoint's token count
    # A sharded checkpoint read with ``lazy_shards``: its folder (the tensors above are then on the
    # meta device: shapes and dtypes only) and each tensor's key in it.
    shards: Path | None = None
    shard_keys: dict[str, str] = field(default_factory=dict)
    _given: bool = field(default=False, repr=False)  # whether a built model holds these tensors

    def build(self, **overrides: Any) -> MambaLMHeadModel:
        """A ``MambaLMHeadModel`` with these weights (config fields overridable, e.g. ``impl``).

        Built on the meta device and given the read tensors themselves (``assign``), so a
        memory-mapped checkpoint is never copied: the model holds one copy of its weights. A
        second ``build`` copies them, so two models never share (and train) the same tensors.
        """
        from dataclasses import replace

        assert self.shards is None, "read with lazy_shards: only a sharded model reads these"
        with torch.device("meta"):
            model = MambaLMHeadModel(replace(self.config, **overrides) if overrides else self.config)
        sd = {k: v.clone() for k, v in self.state_dict.items()} if self._given else self.state_dict
        self._given = True
        load_weights(model, sd, self.source)
        return model


# ----------------------------------------------------------------------------------------------
# HF transformers and mamba_ssm folders: which format, its config, its weight files


def is_hf_config(raw: dict[str, Any]) -> bool:
    """HF configs name their ``model_type``; mamba_ssm's ``MambaConfig.__dict__`` never does."""
    return "model_type" in raw


def read_weight_files(path: Path) -> dict[str, Tensor]:
    """Every weight file of a model folder, memory-mapped and verified (handover.reader)."""
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    for index_name, reader in (
        ("model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin.index.json", read_torch_weights),
    ):
        index = path / index_name
        if index.is_file():
            sd: dict[str, Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                sd.update(reader(path / shard))
            return sd
    if (path / "pytorch_model.bin").is_file():
        return read_torch_weights(path / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{path} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin(.index.json)"
    )


def read_pretrained(path: str | Path) -> tuple[MambaConfig, dict[str, Tensor], str]:
    """Config and weights (our parameter names) of a local HF or mamba_ssm directory, and its format."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not an HF or mamba_ssm model directory")
    raw = read_json_object(config_path, "a JSON object of model settings")
    is_hf = is_hf_config(raw)
    cfg = config_from_hf(raw, str(config_path)) if is_hf else config_from_mamba_ssm(raw, str(config_path))
    sd = read_weight_files(path)
    if is_hf:
        sd = state_dict_from_hf(sd, raw["model_type"], cfg)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd, "hf" if is_hf else "mamba_ssm"


def load_weights(model: MambaLMHeadModel, sd: dict[str, Tensor], source: str) -> None:
    """Load a complete state dict (tied head optional), naming every mismatch."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sd
        if k in expected and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source}: weights do not match the config: missing {missing}, unexpected {unexpected}, "
            f"shapes {wrong}"
        )
    assign_weights(model, sd)


# ----------------------------------------------------------------------------------------------
# Object stores (Composer's layer)


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names an object store (``s3://bucket/key``) rather than a local path."""
    from composer.utils import parse_uri

    return bool(parse_uri(str(path))[0])


def _store_and_key(uri: str) -> tuple[Any, str]:
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    try:
        store = maybe_create_object_store_from_uri(uri)
    except NotImplementedError as exc:
        raise ValueError(f"{uri}: {exc}") from exc
    return store, parse_uri(uri)[2].rstrip("/")


def remote_exists(uri: str) -> bool:
    """Whether an object exists at ``uri``."""
    store, key = _store_and_key(uri)
    try:
        store.get_object_size(key)
    except FileNotFoundError:
        return False
    return True


def list_remote(uri: str) -> list[str]:
    """Object names (relative to ``uri``) under the prefix ``uri/``."""
    store, key = _store_and_key(uri)
    prefix = key + "/" if key else ""
    return sorted(name[len(prefix) :] for name in store.list_objects(prefix) if name.startswith(prefix))


def download(uri: str, dest: Path) -> Path:
    """Download one object, or every object under ``uri/`` when it is a "folder", to ``dest``."""
    store, key = _store_and_key(uri)
    if remote_exists(uri):
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_object(key, str(dest), overwrite=True)
        return dest
    names = list_remote(uri)
    if not names:
        raise FileNotFoundError(f"{uri}: no such object or folder on the object store")
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_object(f"{key}/{name}", str(target), overwrite=True)
    return dest


def upload_dir(local: Path, uri: str, last: tuple[str, ...] = ("config.json",)) -> None:
    """Upload every file of ``local`` under ``uri/``; the files named in ``last`` go last.

    Object stores have no atomic folder rename: uploading the file that readers look for first
    (``config.json``) last means a reader never sees it beside missing weights.
    """
    store, key = _store_and_key(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for path in files:
        store.upload_object(f"{key}/{path.relative_to(local).as_posix()}", str(path))


@contextlib.contextmanager
def staged(source: str | Path) -> Iterator[Path]:
    """A local path for ``source``: itself, or a temporary download of a remote object or folder."""
    if not is_uri(source):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="handover-") as tmp:
        name = str(source).rstrip("/").rsplit("/", 1)[-1] or "object"
        yield download(str(source), Path(tmp) / name)


# ----------------------------------------------------------------------------------------------
# What a source is


def _remote_latest(uri: str) -> str | None:
    """A remote run folder's latest checkpoint: Composer uploads ``latest-rank0.pt.symlink``, a
    small object holding the name of the newest checkpoint object."""
    for candidate in (f"{uri}/checkpoints/{LATEST}.symlink", f"{uri}/{LATEST}.symlink"):
        if remote_exists(candidate):
            with tempfile.TemporaryDirectory() as tmp:
                target = download(candidate, Path(tmp) / "symlink").read_text().strip()
            from composer.utils import parse_uri

            backend, bucket, _ = parse_uri(uri)
            return f"{backend}://{bucket}/{target}"
    return None


def resolve(source: str | Path) -> str:
    """A run folder becomes its latest checkpoint; anything else is returned as it is."""
    source = str(source).rstrip("/")
    if is_uri(source):
        return _remote_latest(source) or source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source} does not exist (expected a run folder, checkpoint or model directory)"
        )
    for latest in (path / "checkpoints" / LATEST, path / LATEST):
        if latest.exists():
            return str(latest.resolve())
    if (path / "run.json").is_file():
        raise FileNotFoundError(
            f"{source} is a run folder without checkpoints ({path / 'checkpoints' / LATEST} is missing): "
            "it has not saved one yet"
        )
    return source


def _config_from_run_json(checkpoint: Path) -> tuple[MambaConfig, str] | None:
    """The model config in ``run.json`` of the run folder holding ``checkpoint`` (older checkpoints)."""
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        run_json = run_dir / "run.json"
        if run_json.is_file():
            config = json.loads(run_json.read_text())["config"]
            return config_from_dict(MambaConfig, config["model"], source=str(run_json)), config.get(
                "tokenizer", ""
            )
    return None


def _config_from_record(record: dict[str, Any] | None, source: str) -> tuple[MambaConfig, str] | None:
    if not record or not record.get("model_config_json"):
        return None
    values = json.loads(record["model_config_json"])
    return config_from_dict(MambaConfig, values, source=f"{source} ({RECORD})"), record.get("tokenizer", "")


def _read_monolithic(
    path: Path, label: str, trust: bool, opt_in: str
) -> tuple[dict[str, Tensor], dict[str, Any] | None, int | None]:
    ckpt = read_composer(path, trust=trust, label=label, opt_in=opt_in)
    if "model" not in ckpt["state"]:
        raise ValueError(f"{label}: not a Composer checkpoint (no state/model inside)")
    model = ckpt["state"]["model"]
    sd = {k.removeprefix(MODEL_PREFIX): v for k, v in model.items() if k.startswith(MODEL_PREFIX)}
    record = ckpt["state"].get("callbacks", {}).get(RECORD)
    return sd, record, tokens_trained(ckpt)


def _read_sharded(
    path: Path, label: str, opt_in: str, lazy: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    record_prefix = f"state.callbacks.{RECORD}."
    if lazy:  # the record now; the weights' shapes from the metadata, their bytes later, rank by rank
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        verify(path, label)
        flat = read_sharded(path, lambda key: key.startswith(record_prefix), label=label, opt_in=opt_in)
        for key, meta in read_dcp_metadata(path, label, opt_in).state_dict_metadata.items():
            if key.startswith(DCP_MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata):
                flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
    else:
        flat = read_sharded(
            path, lambda key: key.startswith((DCP_MODEL_PREFIX, record_prefix)), label=label, opt_in=opt_in
        )
    sd = {k.removeprefix(DCP_MODEL_PREFIX): v for k, v in flat.items() if k.startswith(DCP_MODEL_PREFIX)}
    if not sd:
        raise ValueError(f"{path}: a torch.distributed.checkpoint folder without Composer model weights")
    record = {k.removeprefix(record_prefix): v for k, v in flat.items() if k.startswith(record_prefix)}
    return sd, record or None


def _read_local(
    path: Path, label: str, config: MambaConfig | None, trust: bool, opt_in: str, lazy_shards: bool = False
) -> ModelWeights:
    if path.is_dir() and (path / "config.json").is_file():
        cfg, sd, fmt = read_pretrained(path)
        special = (
            hf_config_special_ids(json.loads((path / "config.json").read_text())) if fmt == "hf" else None
        )
        return ModelWeights(cfg, sd, label, fmt, special_token_ids=special)
    tokens = None
    if path.is_dir() and (path / ".metadata").is_file():
        sd, record = _read_sharded(path, label, opt_in, lazy=lazy_shards)
        fmt = "composer-sharded"
    elif path.is_file():
        sd, record, tokens = _read_monolithic(path, label, trust, opt_in)
        fmt = "composer"
    else:
        raise ValueError(
            f"{label}: not a checkpoint: expected a run folder, a Composer checkpoint (a .pt file or a sharded "
            "folder with .metadata), or an HF / mamba_ssm directory with config.json"
        )
    found = _config_from_record(record, label) or (None if is_uri(label) else _config_from_run_json(path))
    if config is None and found is None:
        raise ValueError(
            f"{label}: this Composer checkpoint does not record its model config (written before "
            f"{RECORD}) and no run.json is beside it; pass the model config explicitly"
        )
    cfg, tokenizer = (config, found[1] if found else "") if config is not None else found
    special = (record or {}).get("special_token_ids_json") or ""
    return ModelWeights(
        cfg,
        sd,
        label,
        fmt,
        tokenizer,
        special_token_ids=json.loads(special) if special else None,
        tokens_trained=tokens,
        shards=path if lazy_shards and fmt == "composer-sharded" else None,
        shard_keys={k: DCP_MODEL_PREFIX + k for k in sd} if lazy_shards and fmt == "composer-sharded" else {},
    )


def read_weights(
    source: str | Path,
    config: MambaConfig | None = None,
    *,
    trust: bool = False,
    opt_in: str = TRUST_HINT,
    lazy_shards: bool = False,
) -> ModelWeights:
    """Config and weights from a run folder, Composer checkpoint, HF or mamba_ssm directory, local or remote.

    ``config`` is only needed for a Composer checkpoint that records none (see the module doc).
    Every file is verified once and read lazily through ``handover.reader``; a Composer
    checkpoint is unpickled with ``weights_only=True`` unless ``trust`` (the user's ``opt_in``,
    named when a checkpoint is refused). A corrupt file raises ``CorruptCheckpoint``.

    ``lazy_shards``: a local sharded checkpoint's tensors are not read, only described (meta
    tensors, ``ModelWeights.shards``): a sharded model then reads its own parts of them with
    ``handover.reader.read_sharded_into`` (init_from under FSDP). A remote one is
    downloaded and read whole: its temporary copy does not outlive this call.
    """
    resolved = resolve(source)
    label = str(source) if resolved == str(source).rstrip("/") else f"{source} ({resolved})"
    with staged(resolved) as local:
        weights = _read_local(local, label, config, trust, opt_in, lazy_shards and not is_uri(resolved))
    return weights


def load_model(source: str | Path, trust: bool = False, **overrides: Any) -> MambaLMHeadModel:
    """``read_weights(source, trust=trust).build(**overrides)``: the model, in eval mode."""
    return read_weights(source, trust=trust).build(**overrides).eval()
