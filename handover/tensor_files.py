"""Tensors to and from files one at a time: a safetensors writer that reads each tensor only when it
is written, and the release of a memory-mapped tensor's pages once it has been used.

Used by the HF export (``handover.hf_mamba``), the training-state release
(``handover.training_state``) and the checkpoint reader (``handover.reader``); it imports none of
them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


@dataclass
class PendingTensor:
    """A tensor to write: its name, dtype and shape now, its values when ``read()`` is called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], Tensor]
    release: Callable[[Tensor], None] = lambda tensor: None  # after writing: drop its memory-mapped pages

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, tensors: list[PendingTensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file reading one tensor at a time (the format: an 8-byte little-endian
    header length, a JSON header of dtypes, shapes and byte ranges, then the raw data)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors code here")
        header[t.name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = t.read()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise ValueError(
                    f"{t.name}: read {value.dtype} {tuple(value.shape)}, expected {t.dtype} {t.shape}"
                )
            flat = value.detach().cpu().contiguous().view(-1)
            f.write(memoryview(flat.view(torch.uint8).numpy()))  # no copy of a contiguous tensor
            t.release(value)
            del value, flat


def drop_mapped_pages(tensor: Tensor) -> None:
    """Tell the kernel a memory-mapped tensor's pages are not needed any more (``MADV_DONTNEED``).

    The checkpoint is mapped read-only and private: the pages are clean copies of the file and are
    read again if touched. Without this, every moment read stays resident until the mapping is
    closed, and the process's memory grows to the optimizer's size.
    """
    import ctypes
    import mmap

    if tensor.numel() == 0 or not hasattr(ctypes.CDLL(None), "madvise"):
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = (start + page - 1) // page * page  # only whole pages of this tensor, never a neighbour's
    last = end // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED
