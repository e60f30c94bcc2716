"""Peak memory of ``recipes.export --with-training-state`` on a checkpoint of a model preset.

    python benchmarks/bench_release_rss.py --preset 130m --work /tmp/release-rss

Builds a monolithic Composer checkpoint of the preset with random weights and random AdamW
moments (fp32, as a run of ``recipes/train.py`` saves it: ``state/model``,
``state/optimizers/AdamW``, timestamp, the ``HandoverRecord``), then measures, each in a fresh
process, the peak resident memory (``VmHWM``) of

- the whole export (``python -m recipes.export CKPT --to hf --out DIR --with-training-state``);
- Python with the imports alone (the floor);
- the optimizer part alone (``handover.training_state.write_training_state``: the moments read
  from the memory-mapped checkpoint and written tensor by tensor).

The checkpoint is built without holding it in memory: the random values are written once to a
raw file in pieces, and every tensor of the state (weight, ``exp_avg``, ``exp_avg_sq``) is a
read-only memory map of its span of that file, which ``torch.save`` streams into the checkpoint
(page cache only; the 1.6B preset's 19.5 GB checkpoint fits this way on a 24 GB machine shared
with others). The moments' values are random, as the weights' (the export does not look at
them). The files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import to_dict  # noqa: E402
from models.config import preset  # noqa: E402
from models.mamba_lm import MambaLMHeadModel  # noqa: E402

GiB = 1024**3
SPECIAL = {
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "unk_token_id": None,
}  # what a run records


def build_checkpoint(name: str, path: Path) -> tuple[int, int]:
    """A Composer-layout checkpoint of preset ``name``: (parameters, file bytes)."""
    import warnings

    cfg = preset(name)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in MambaLMHeadModel(cfg).named_parameters()}
    n_params = sum(int(np.prod(shape)) for shape in shapes.values())
    raw = path.with_name("values.f32")
    gen = torch.Generator().manual_seed(0)
    with open(raw, "wb") as f:
        for start in range(0, n_params, 1 << 24):
            f.write(torch.randn(min(1 << 24, n_params - start), generator=gen).mul_(0.02).numpy().tobytes())

    def mapped(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        # Its own memory map: a distinct storage, so torch.save writes it as a tensor of its own.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(np.memmap(raw, np.float32, "r", offset * 4, shape))

    model, optim_state, offset = {}, {}, 0
    for n, shape in shapes.items():
        model[f"model.{n}"] = mapped(offset, shape)
        optim_state[f"model.{n}"] = {
            "exp_avg": mapped(offset, shape),
            "exp_avg_sq": mapped(offset, shape),
            "step": torch.tensor(1000.0),
        }
        offset += int(np.prod(shape))
    groups = [
        {"lr": 4.5e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(optim_state)}
    ]
    state = {
        "model": model,
        "optimizers": {"AdamW": {"state": optim_state, "param_groups": groups}},
        "timestamp": {"Timestamp": {"epoch": 0, "batch": 1000, "sample": 896000, "token": 896000 * 4096}},
        "callbacks": {
            "HandoverRecord": {
                "model_config_json": json.dumps(to_dict(cfg)),
                "tokenizer": "",
                "special_token_ids_json": json.dumps(SPECIAL),
            }
        },
    }
    torch.save({"state": state}, path)
    del model, optim_state, state
    raw.unlink()
    return n_params, path.stat().st_size


def peak_rss(code: str) -> float:
    """Peak resident memory (GiB) of a fresh Python process running ``code``: its ``VmHWM``.

    Not ``ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so a child would report at
    least this process's own peak (it held the checkpoint while building it).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    probe = "; print('PEAK_RSS_KIB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    out = subprocess.run(
        [sys.executable, "-c", code + probe], check=True, cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout
    kib = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return kib * 1024 / GiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="130m")
    parser.add_argument("--work", default="/tmp/release-rss", help="scratch folder (deleted at the end)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "ckpt.pt"
        n_params, size = build_checkpoint(args.preset, ckpt)
        baseline = peak_rss("import handover.training_state, handover.export")
        optimizer_only = peak_rss(
            "from pathlib import Path; import os; from handover.training_state import write_training_state; "
            f"out = Path({str(work / 'opt')!r}); os.makedirs(out, exist_ok=True); "
            f"write_training_state(Path({str(ckpt)!r}), 'ckpt', out, str(out))"
        )
        whole = peak_rss(
            "from handover.export import export; "
            f"export({str(ckpt)!r}, 'hf', {str(work / 'hf')!r}, overwrite=True, with_training_state=True)"
        )
        moments = (work / "hf" / "optimizer.safetensors").stat().st_size
        print(f"\npreset {args.preset}: {n_params / 1e6:.0f}M parameters; checkpoint {size / GiB:.2f} GiB")
        print(f"(weights {4 * n_params / GiB:.2f} GiB fp32, moments {moments / GiB:.2f} GiB)\n")
        print("| what | peak RSS (GiB) | / checkpoint size |\n|---|---|---|")
        print(f"| Python + imports, nothing read | {baseline:.2f} | {baseline * GiB / size:.2f} |")
        print(
            f"| moments only (write_training_state) | {optimizer_only:.2f} | {optimizer_only * GiB / size:.2f} |"
        )
        print(f"| whole export --with-training-state | {whole:.2f} | {whole * GiB / size:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
