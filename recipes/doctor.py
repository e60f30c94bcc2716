"""``make doctor``: one table of the software stack and the model path this machine will use.

python -m recipes.doctor
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Sequence

import torch

from common import cli
from common.threads import decide_threads
from models.kernels import cpu_scan_status, kernel_status


def version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def rows() -> list[tuple[str, str]]:
    cuda = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        gpu = f"{torch.cuda.device_count()} x {devices}"
    else:
        gpu = "none visible"
    kernels, reason = kernel_status()
    fused, cpu_scan_reason = cpu_scan_status()
    threads, threads_why = decide_threads(None)
    path = "mamba_ssm / causal_conv1d kernels" if kernels else "PyTorch (models/ops.py)"
    return [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("CUDA (torch build)", cuda),
        ("GPUs", gpu),
        ("composer (mosaicml)", version("mosaicml")),
        ("streaming (mosaicml-streaming)", version("mosaicml-streaming")),
        ("transformers", version("transformers")),
        ("tokenizers", version("tokenizers")),
        ("mamba_ssm", version("mamba-ssm")),
        ("causal_conv1d", version("causal-conv1d")),
        ("model path (model.impl=auto)", path),
        ("why", reason),
        (
            "CPU scan, Mamba-1",
            cpu_scan_reason if fused else f"PyTorch loop (models/ops.py): {cpu_scan_reason}",
        ),
        ("CPU scan, Mamba-2", "PyTorch chunked SSD (models/ops.py; matrix products)"),
        ("threads per rank (train.py)", f"{threads} ({threads_why})"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    cli.parser("python -m recipes.doctor", __doc__).parse_args(argv)
    table = rows()
    width = max(len(k) for k, _ in table)
    print(f"{'component'.ljust(width)} | version / status")
    print(f"{'-' * width}-+-{'-' * 40}")
    for key, value in table:
        print(f"{key.ljust(width)} | {value}")


if __name__ == "__main__":
    cli.run(main)
