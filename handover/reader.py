"""The one place a checkpoint file is opened: verified once, read lazily, and never run as code.

Every command that reads a checkpoint (a resume's checks, ``init_from``, ``recipes.evaluate``,
``recipes.export``, ``eval.report``, the checkpoint recovery before a restart) goes through
these functions:

- ``verify(path)``: the integrity check, done once per file per process (the result is kept,
  keyed by the file's identity, size and times, so a rewritten file is checked again). A
  monolithic ``.pt`` is a zip archive (torch's format): its central directory must be there and
  every entry must match its CRC-32. A sharded (``torch.distributed.checkpoint``) folder's
  ``.metadata`` must load and every byte range it references must exist. A broken file raises
  ``CorruptCheckpoint`` (exit 3 from the command line, naming the file).
- ``read_composer(path)``: a monolithic Composer checkpoint through ``torch.load(mmap=True,
  weights_only=True)``: tensors stay in the page cache until used, and unpickling may build only
  the plain types a Composer 0.32.1 checkpoint of this repository holds (``SAFE_GLOBALS``). A
  pickle naming anything else is refused (``UntrustedCheckpoint``, exit 2) naming the opt-in
  that reads it as full pickle: a checkpoint from someone else is data, not code.
- ``read_dcp_metadata`` / ``read_sharded``: the same rules for a sharded checkpoint (its
  ``.metadata`` and the pickled non-tensor entries inside its shards go through a restricted
  unpickler; torch's own reader would ``pickle.load`` them).
- ``read_sharded_into`` / ``copy_into_shards``: under FSDP each rank fills only its own shards
  (``DTensor`` rows) of a model, from a sharded checkpoint or from memory-mapped full tensors;
  ``MATERIALISED`` counts the bytes each process copied.
- ``read_safetensors`` / ``read_torch_weights``: an HF or mamba_ssm folder's files, lazily
  (safetensors memory-maps; a ``pytorch_model.bin`` is read with ``mmap=True, weights_only=True``).

Only the run's own resume (its autoresume checkpoint, written by this code) is read with full
pickle, by Composer itself; ``install_checkpoint_reads`` makes that load memory-mapped too, and
hands Composer the object the run's checks already read instead of reading the file twice.
"""

from __future__ import annotations

import collections
import datetime
import functools
import io
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.cli import RunStopped, UserError

TRUST_HINT = "--trust-checkpoint"  # the opt-in of the command-line tools; train names its YAML key


class CorruptCheckpoint(RunStopped):
    """A checkpoint file whose bytes are not what was written (exit 3: a fault, not a mistake)."""


class NotACheckpoint(UserError):
    """A file given as a checkpoint that is no checkpoint at all (a text file, an image): a mistake."""


class UntrustedCheckpoint(UserError):
    """A checkpoint whose unpickling would build objects outside the allow-list (it could run code)."""


# ----------------------------------------------------------------------------------------------
# What a Composer checkpoint may hold


def _composer_globals() -> list[Any]:
    """The non-tensor types a Composer 0.32.1 checkpoint of this repository pickles.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` over the 270 checkpoints
    the test suite writes (every recipe and callback here; tests/test_checkpoint_reader.py checks
    a fresh one): ``datetime.timedelta`` (Composer's wall-clock times), torch's ``TorchVersion``
    (the checkpoint's metadata), and NumPy's RNG state (an ``ndarray`` of uint32, rebuilt through
    ``numpy._core.multiarray._reconstruct`` and ``numpy.dtype``). Composer's ``Timestamp`` is
    stored as plain ints.
    """
    from numpy._core.multiarray import _reconstruct
    from torch.torch_version import TorchVersion

    return [datetime.timedelta, TorchVersion, np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]


SAFE_GLOBALS: list[Any] = _composer_globals()


def _untrusted(label: str, exc: Exception, opt_in: str) -> UntrustedCheckpoint:
    return UntrustedCheckpoint(
        f"{label} holds pickled objects outside the types a checkpoint needs ({exc}); reading it could run "
        f"code. If you trust where it came from, pass {opt_in}"
    )


# ----------------------------------------------------------------------------------------------
# Integrity, once per file


_VERIFIED: dict[tuple[str, int, int, int, int], str | None] = {}
CHECKS: collections.Counter[str] = collections.Counter()  # full integrity reads per file (tests count them)


def _identity(path: Path) -> tuple[str, int, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _sharded_identity(folder: Path) -> tuple[str, int, int, int, int]:
    files = [p for p in folder.iterdir() if p.is_file()]
    stats = [p.stat() for p in files]
    return (
        str(folder.resolve()),
        len(files),
        sum(s.st_size for s in stats),
        max((s.st_mtime_ns for s in stats), default=0),
        max((s.st_ctime_ns for s in stats), default=0),
    )


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None if it is whole (see the module doc).

    The answer is kept for the file as it is now: asking again about an unchanged file reads
    nothing. Formats other than ``.pt`` and sharded folders (``.pt.zst``, tarballs) are checked
    for presence only.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return "it has no .metadata (torch writes it last: the save was interrupted)"
        key = _sharded_identity(path)
    elif not path.is_file():
        return "it does not exist"
    else:
        key = _identity(path)
    if key not in _VERIFIED:
        CHECKS[key[0]] += 1
        _VERIFIED[key] = _sharded_problem(path) if path.is_dir() else _monolithic_problem(path)
    return _VERIFIED[key]


def _monolithic_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "it is empty (0 bytes): the write was interrupted"
    if path.suffix not in (".pt", ".bin") and not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"it is truncated or not a checkpoint ({exc})"
    if bad is not None:
        return f"its entry {bad} fails its CRC-32 check (the file's bytes changed after it was written)"
    return None


def _sharded_problem(folder: Path) -> str | None:
    try:
        meta = read_dcp_metadata(folder)
    except UntrustedCheckpoint:
        raise  # not a broken file: a refused one
    except Exception as exc:  # a torn or foreign pickle raises many kinds of errors
        return f"its .metadata cannot be read ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for item in (getattr(meta, "storage_data", None) or {}).values():
        name = str(getattr(item, "relative_path", ""))
        end = int(getattr(item, "offset", 0)) + int(getattr(item, "length", 0))
        needed[name] = max(needed.get(name, 0), end)
    for name, end in sorted(needed.items()):
        file = folder / name
        if not file.is_file():
            return f"its shard file {name} is missing"
        if file.stat().st_size < end:
            return f"its shard file {name} is truncated ({file.stat().st_size} bytes, {end} expected)"
    return None


# The first bytes of what a checkpoint file can be: a zip archive (torch's format), a legacy
# pickle, a zstd frame or a gzip stream (compressed checkpoints); a tar archive says so at byte 257.
_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"\x80", b"\x28\xb5\x2f\xfd", b"\x1f\x8b")


def _foreign(path: Path) -> bool:
    """Whether the file at ``path`` is no checkpoint of any kind (its first bytes say so)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        head = f.read(512)
    return not head.startswith(_MAGICS) and head[257:262] != b"ustar"


def verify(path: str | Path, label: str | None = None) -> None:
    """Check ``path`` once: ``NotACheckpoint`` (exit 2) for a file that is no checkpoint at all (a
    mistake), ``CorruptCheckpoint`` (exit 3) for one whose bytes are damaged (a fault)."""
    where = f"{label} ({path})" if label and label != str(path) else str(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"the checkpoint {where} does not exist: check the path")
    if _foreign(Path(path)):
        raise NotACheckpoint(
            f"{where} is not a checkpoint (not a zip archive or pickle, as torch writes them): give a "
            "Composer checkpoint (*.pt), a sharded checkpoint folder, a run folder, or an HF / mamba_ssm folder"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CorruptCheckpoint(
            f"the checkpoint {where} is corrupt: {problem}. Use another checkpoint (or fetch this one again)"
        )


# ----------------------------------------------------------------------------------------------
# Monolithic files


READS: collections.Counter[str] = collections.Counter()  # torch.load calls per file (tests count them)
_KEPT: dict[tuple[str, int, int, int, int], Any] = {}


def _torch_load(path: Path, trust: bool, label: str, opt_in: str) -> Any:
    READS[str(path.resolve())] += 1
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust:
            raise ValueError(f"{label}: not a readable checkpoint ({exc})") from exc
        raise _untrusted(label, exc, opt_in) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{label}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def read_composer(
    path: str | Path,
    *,
    trust: bool = False,
    label: str | None = None,
    opt_in: str = TRUST_HINT,
    keep: bool = False,
) -> dict[str, Any]:
    """A monolithic Composer checkpoint, verified and memory-mapped (see the module doc).

    ``trust``: full pickle (the run's own resume, or an explicit opt-in). ``keep``: hold on to the
    result so that the next ``read_composer`` of the same unchanged file (Composer's own load of
    a resume) gets it without reading the file again; that next read takes it.
    """
    path = Path(path)
    label = label or str(path)
    verify(path, label)
    key = _identity(path)
    if key in _KEPT:
        state = _KEPT[key] if keep else _KEPT.pop(key)
    else:
        state = _torch_load(path, trust, label, opt_in)
        if keep:
            _KEPT[key] = state
    if not isinstance(state, dict) or "state" not in state:
        raise ValueError(f"{label}: not a Composer checkpoint (no state inside)")
    return state


def tokens_trained(state: dict[str, Any]) -> int | None:
    """The token count in a Composer checkpoint's timestamp (None when it has none)."""
    stamp = state.get("state", {}).get("timestamp", {})
    tokens = stamp.get("Timestamp", {}).get("token") if isinstance(stamp, dict) else None
    return int(tokens) if tokens is not None else None


def read_torch_weights(path: str | Path, label: str | None = None) -> dict[str, Tensor]:
    """A ``pytorch_model.bin`` (a plain state dict): verified, memory-mapped, tensors only."""
    path = Path(path)
    verify(path, label)
    return _torch_load(path, False, label or str(path), "nothing: a weights file holds tensors only")


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """A ``.safetensors`` file, memory-mapped (safetensors' loader maps the file; nothing is copied)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    READS[str(Path(path).resolve())] += 1
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise CorruptCheckpoint(f"the weights file {path} is corrupt: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Sharded (torch.distributed.checkpoint) folders


@functools.cache
def _dcp_globals() -> dict[tuple[str, str], Any]:
    """What a ``.metadata`` of torch 2.7 pickles (listed from the suite's sharded checkpoints):
    torch.distributed.checkpoint's metadata classes, ``torch.Size``, dtypes, the layout by name,
    and the shard files' relative paths."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed = [
        md.Metadata,
        md.TensorStorageMetadata,
        md.BytesStorageMetadata,
        md.ChunkStorageMetadata,
        md.TensorProperties,
        md.MetadataIndex,
        md.StorageMeta,
        md._MEM_FORMAT_ENCODING,
        fs._StorageInfo,
        torch.Size,
        collections.OrderedDict,
        pathlib.PurePosixPath,
        pathlib.PosixPath,
    ]
    found = {(t.__module__, t.__qualname__): t for t in allowed}
    found[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):
        value = getattr(torch, name)
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            found[("torch", name)] = value
    return found


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _dcp_globals()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a checkpoint's .metadata"
            ) from None


def read_dcp_metadata(folder: str | Path, label: str | None = None, opt_in: str = TRUST_HINT) -> Any:
    """A sharded checkpoint's ``.metadata``, unpickled with only torch.distributed.checkpoint's types."""
    folder = Path(folder)
    with (folder / ".metadata").open("rb") as f:
        try:
            return _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            if "is not allowed" not in str(exc):
                raise
            raise _untrusted(f"{label or folder}/.metadata", exc, opt_in) from exc


def safe_reader_and_planner(folder: Path, label: str, opt_in: str) -> tuple[Any, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Reader(dcp.FileSystemReader):
        def read_metadata(self) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            meta = read_dcp_metadata(folder, label, opt_in)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                with torch.serialization.safe_globals(SAFE_GLOBALS):
                    obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise _untrusted(f"{label} ({read_item.dest_index.fqn})", exc, opt_in) from exc
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Reader(str(folder)), Planner()


def read_sharded(
    folder: str | Path,
    select: Callable[[str], bool],
    *,
    label: str | None = None,
    opt_in: str = TRUST_HINT,
    no_dist: bool = True,
) -> dict[str, Any]:
    """The entries of a sharded checkpoint whose flattened key ``select`` accepts, as a flat dict.

    Verified first. Tensors are allocated from the checkpoint's own metadata and filled by
    ``torch.distributed.checkpoint.load``; with ``no_dist`` one process assembles every rank's
    shards. Non-tensor entries are read with ``weights_only=True``.
    """
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    label = label or str(folder)
    verify(folder, label)
    metadata = read_dcp_metadata(folder, label, opt_in).state_dict_metadata
    flat: dict[str, Any] = {}
    for key, meta in metadata.items():
        if select(key):
            is_tensor = isinstance(meta, TensorStorageMetadata)
            flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype) if is_tensor else None
    if not flat:
        return {}
    # The nested layout flattens back to these keys (``state.model.model.<name>``: dots in module
    # names nest the same way); DCP reads every rank's shard of each tensor into them.
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value if value is not None else ""
    reader, planner = safe_reader_and_planner(folder, label, opt_in)
    READS[str(folder.resolve())] += 1
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming ... a single process": exactly the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, storage_reader=reader, planner=planner, no_dist=no_dist)
    out: dict[str, Any] = {}
    for key in flat:
        node = nested
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def read_sharded_into(
    folder: str | Path, targets: dict[str, Tensor], *, label: str | None = None, opt_in: str = TRUST_HINT
) -> None:
    """Fill ``targets`` (keyed by the checkpoint's flattened keys) from a sharded checkpoint, in place.

    A target that is a ``DTensor`` (a parameter of a model FSDP has sharded) receives only this
    process's part: ``torch.distributed.checkpoint`` reads the byte ranges that overlap it and
    nothing else, so each rank materialises its own shards. Runs in this process alone (no
    collective): every rank can call it at its own pace. Verified first.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    label = label or str(folder)
    verify(folder, label)
    nested: dict[str, Any] = {}
    for key, target in targets.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = target
    reader, planner = safe_reader_and_planner(folder, label, opt_in)
    READS[str(folder.resolve())] += 1
    dcp.load(nested, storage_reader=reader, planner=planner, no_dist=True)
    for target in targets.values():
        local, _ = local_part(target)
        MATERIALISED[label] += local.numel() * local.element_size()


# ----------------------------------------------------------------------------------------------
# Composer's own resume


def check_as_data(path: str | Path, label: str, opt_in: str) -> None:
    """Refuse (``UntrustedCheckpoint``) a Composer checkpoint that would run code when Composer loads it.

    A monolithic file is read with ``weights_only=True`` and kept for Composer's own load; of a
    sharded folder every non-tensor entry (Composer unpickles them with full pickle) is read
    with ``weights_only=True`` (they are small: clock, RNG and callback states).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    if path.is_dir():
        metadata = read_dcp_metadata(path, label, opt_in).state_dict_metadata
        pickled = {k for k, m in metadata.items() if isinstance(m, BytesStorageMetadata)}
        read_sharded(path, pickled.__contains__, label=label, opt_in=opt_in)
    else:
        read_composer(path, trust=False, label=label, opt_in=opt_in, keep=True)


_COMPOSER_TRUSTS = [True]  # whether Composer's own load of an unchecked file may use full pickle


def install_checkpoint_reads(trust_unchecked: bool = True) -> None:
    """Route Composer's monolithic load through ``read_composer`` (memory-mapped, verified).

    Composer 0.32.1 loads with ``torch.load(path, weights_only=False)`` into memory, after the
    run's checks (``recipes/train.py``) already read the file: it now gets the object those
    checks read (``keep=True``), so the file is read once. A file no check read (a download from
    an object store) is read with full pickle only if ``trust_unchecked`` (the run's own
    autoresume); otherwise as data, like any checkpoint from elsewhere.
    """
    from composer.utils import checkpoint as composer_checkpoint

    _COMPOSER_TRUSTS[0] = trust_unchecked
    original = composer_checkpoint._torch_load_with_validation
    if getattr(original, "shared_reads", False):
        return

    def load(checkpoint_filepath: str | Path, map_location: str) -> Any:
        path = Path(composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath))
        if map_location != "cpu":
            return original(checkpoint_filepath, map_location)
        return read_composer(path, trust=_COMPOSER_TRUSTS[0], opt_in="checkpoint.trust=true")

    load.shared_reads = True  # type: ignore[attr-defined]
    composer_checkpoint._torch_load_with_validation = load


def file_size(path: str | Path) -> int:
    """Bytes of a checkpoint file, or of every file of a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return os.path.getsize(path)


# ----------------------------------------------------------------------------------------------
# Into a model without a copy


def assign_weights(model: torch.nn.Module, weights: dict[str, Tensor]) -> None:
    """Make ``weights`` (a subset of ``model``'s state dict, shapes checked by the caller) its tensors.

    ``load_state_dict(assign=True)``: the model's parameters become the read tensors themselves
    (memory-mapped ones stay mapped until written), so loading never holds two copies. A tensor
    in another dtype is converted; one read tensor given to two parameters is copied for the
    second, so they never share storage; parameters the model ties (one ``Parameter`` under two
    names, e.g. a tied LM head) stay tied to the one assigned.
    """
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    expected = model.state_dict()
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in weights.items():
        key = aliases.get(key, key)
        if key in out:
            continue
        value = value.to(expected[key].dtype)
        where = (value.untyped_storage().data_ptr(), value.storage_offset())
        if where in seen:
            value = value.clone()
        seen.add(where)
        out[key] = value
    with torch.no_grad():
        result = model.load_state_dict(out, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    for alias, name in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, attr, model.get_parameter(name))


MATERIALISED: collections.Counter[str] = collections.Counter()  # bytes copied into shards, per source


def local_part(target: Tensor) -> tuple[Tensor, tuple[slice, ...]]:
    """What this process holds of ``target`` and where that part sits in the full tensor.

    A ``DTensor`` (FSDP's sharded parameter) holds a block of the full tensor (FSDP2: a chunk of
    rows, possibly empty on the last ranks); a plain tensor holds all of it.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(target, DTensor):
        return target, tuple(slice(0, n) for n in target.shape)
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    with torch.no_grad():
        local = target.to_local()
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def copy_into_shards(targets: dict[str, Tensor], sources: dict[str, Tensor], label: str) -> None:
    """Copy into each of ``targets`` its part of the source of the same name (shapes checked by the caller).

    The sources are the full tensors as read (memory-mapped: slicing one touches only the pages
    of the part taken), the targets a sharded model's parameters: each process copies, and so
    reads, only the rows it holds. ``MATERIALISED[label]`` counts the bytes copied.
    """
    with torch.no_grad():
        for key, target in targets.items():
            local, where = local_part(target)
            part = sources[key][where]
            local.copy_(part)
            MATERIALISED[label] += part.numel() * part.element_size()


def _mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of the checkpoint files read here."""
    files = set(READS)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in files:
            low, high = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((low, high))
    return ranges


def release_pages_while_loading(model: torch.nn.Module) -> None:
    """Let ``model.load_state_dict`` from a memory-mapped checkpoint hold one copy of the weights, not two.

    ``load_state_dict`` copies each checkpoint tensor into the model's own (Composer's load of a
    monolithic resume does): the mapped file pages it reads stay resident beside the copies, so
    the process peaks at twice the model. With these hooks, when ``load_state_dict`` reaches a
    module, the pages of the tensors already copied into the modules before it are dropped
    (``MADV_DONTNEED``: clean, read-only file pages, read again from the file if touched), and
    the last ones after the whole load. Only tensors inside this process's maps of checkpoint
    files read by this module are touched; any other state dict loads as before.
    """
    from handover.tensor_files import drop_mapped_pages

    pending: list[Tensor] = []
    ranges: list[tuple[int, int]] = []

    def release() -> None:
        for tensor in pending:
            drop_mapped_pages(tensor)
        pending.clear()

    def before_module(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        release()
        if not ranges:
            ranges.extend(_mapped_ranges() or [(0, 0)])
        own = [*module._parameters, *module._buffers]
        for name in own:
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.numel() == 0:
                continue
            start = value.data_ptr()
            end = start + value.numel() * value.element_size()
            if value.is_contiguous() and any(low <= start and end <= high for low, high in ranges):
                pending.append(value)

    def after_all(module: torch.nn.Module, incompatible: Any) -> None:
        release()
        ranges.clear()  # the next load may map another file

    for module in model.modules():
        module.register_load_state_dict_pre_hook(before_module)
    model.register_load_state_dict_post_hook(after_all)
