"""Hand a trained model on: export a run or checkpoint as an HF transformers or mamba_ssm directory.

    python -m recipes.export runs/demo/decay --to hf --out exports/demo-decay
    python -m recipes.export s3://bucket/run/checkpoints/ep0-ba8000 --to mamba_ssm --out s3://bucket/export

SOURCE is a run folder (its latest checkpoint), a Composer checkpoint of this repository
(monolithic ``.pt`` or a sharded folder), or an HF / mamba_ssm directory (to convert between the
two), local or on an object store (``s3://``, ``gs://``, ``oci://``; ``S3_ENDPOINT_URL`` for
S3-compatible stores). ``--out`` may be an object-store URI too: the directory is written locally
first and uploaded with ``config.json`` last.

``--to hf``: ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``Mamba2ForCausalLM`` (pure models) or
``BambaForCausalLM`` (hybrids), with
the tokenizer (``--tokenizer``, default: the tokenizer the run recorded), its chat template,
bos/eos/pad ids in ``config.json`` and a ``generation_config.json``: ``AutoModelForCausalLM``,
``AutoTokenizer`` and ``pipeline("text-generation")`` load it offline. Without a reachable
tokenizer the ids come from the checkpoint's record (or the source HF config); where neither
states them the export is refused, naming ``--tokenizer``, rather than guessing. ``--to mamba_ssm``:
``config.json`` + ``pytorch_model.bin`` as ``mamba_ssm.MambaLMHeadModel.from_pretrained`` reads
them. Hybrids go to HF as ``BambaForCausalLM`` (handover/bamba.py) when Bamba can hold
them, and to mamba_ssm always.

``--with-training-state`` (``--to hf``, from a Composer checkpoint or run folder): beside the HF
model, AdamW's state in ``optimizer.safetensors`` (HF names, written tensor by tensor),
``training_state.json`` (tokens seen, lr and schedule, data mix and position, tokenizer, recipe)
and a model card ``README.md`` with the command that continues it (``handover/training_state.py``).
A run started with ``init_from`` of it continues exactly as from the Composer checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from common import cli
from handover.export import FORMATS, export


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
        "--with-training-state",
        action="store_true",
        help="--to hf: also write AdamW's state, training_state.json and a model card (a release that continues exactly)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read a Composer checkpoint with full pickle (it can run code); only for a source you trust",
    )
    args = parser.parse_args(argv)
    export(
        args.source,
        args.to,
        args.out,
        args.tokenizer,
        args.overwrite,
        args.with_training_state,
        args.trust_checkpoint,
    )


if __name__ == "__main__":
    cli.run(main)
