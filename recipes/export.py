"""Hand a trained model on: export a run or checkpoint as an HF transformers or mamba_ssm directory.

    python -m recipes.export runs/demo/decay --to hf --out exports/demo-decay
    python -m recipes.export s3://bucket/run/checkpoints/ep0-ba8000 --to mamba_ssm --out s3://bucket/export

SOURCE is a run folder (its latest checkpoint), a Composer checkpoint of this repository
(monolithic ``.pt`` or a sharded folder), or an HF / mamba_ssm directory (to convert between the
two), local or on an object store (``s3://``, ``gs://``, ``oci://``; ``S3_ENDPOINT_URL`` for
S3-compatible stores). ``--out`` may be an object-store URI too: the directory is written locally
first and uploaded with ``config.json`` last.

``--to hf``: ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (pure Mamba-1 or Mamba-2 models), with
the tokenizer (``--tokenizer``, default: the tokenizer the run recorded), its chat template,
bos/eos/pad ids in ``config.json`` and a ``generation_config.json``: ``AutoModelForCausalLM``,
``AutoTokenizer`` and ``pipeline("text-generation")`` load it offline. ``--to mamba_ssm``:
``config.json`` + ``pytorch_model.bin`` as ``mamba_ssm.MambaLMHeadModel.from_pretrained`` reads
them; the only format that holds hybrids (attention layers, MLPs).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import cli
from models.checkpoint_io import is_uri, read_weights, remote_exists, staged, upload_dir
from models.hf_interop import export_hf, export_mamba_ssm

FORMATS = ("hf", "mamba_ssm")


def export(
    source: str,
    to: str,
    out: str,
    tokenizer: str | None = None,
    overwrite: bool = False,
    trust: bool = False,
) -> str:
    """Export ``source`` to ``out`` in format ``to``; returns ``out``.

    ``source`` is verified and read as data (``trust``: full pickle; see models/checkpoint_reader.py).
    """
    if to not in FORMATS:
        raise cli.UserError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    remote_out = is_uri(out)
    if remote_out and not overwrite and remote_exists(f"{out.rstrip('/')}/config.json"):
        raise FileExistsError(f"{out} already holds a model (config.json); pass --overwrite to replace it")
    weights = read_weights(source, trust=trust)
    model = weights.build()
    tokenizer = tokenizer or weights.tokenizer or None
    if tokenizer and not is_uri(tokenizer) and not Path(tokenizer).is_dir():
        if weights.tokenizer == tokenizer:  # recorded by a run on another machine: not an error to lack it
            print(
                f"[export] the run's tokenizer {tokenizer} is not here; exporting without one (--tokenizer DIR)"
            )
            tokenizer = None
        else:
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such directory")
    if to == "mamba_ssm" and tokenizer:
        print("[export] mamba_ssm's format has no tokenizer files; --tokenizer is not used")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local_out = Path(tmp) / "model" if remote_out else Path(out)
        if to == "hf":
            with staged(tokenizer) if tokenizer else contextlib.nullcontext() as tok_dir:
                export_hf(model, local_out, tokenizer_dir=tok_dir, overwrite=overwrite)
        else:
            export_mamba_ssm(model, local_out, overwrite=overwrite)
        if remote_out:
            upload_dir(local_out, out.rstrip("/"))
    print(f"[export] {weights.source} ({weights.format}) -> {out} ({to})")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m recipes.export", __doc__)
    parser.add_argument(
        "source", help="run folder, Composer checkpoint, or HF / mamba_ssm directory (local or URI)"
    )
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, help="output directory (local or object-store URI)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory for --to hf (default: the one the run recorded)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read a Composer checkpoint with full pickle (it can run code); only for a source you trust",
    )
    args = parser.parse_args(argv)
    export(args.source, args.to, args.out, args.tokenizer, args.overwrite, args.trust_checkpoint)


if __name__ == "__main__":
    cli.run(main)
