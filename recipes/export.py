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
them. Hybrids go to HF as ``BambaForCausalLM`` (models/hf_hybrids.py) when Bamba can hold
them, and to mamba_ssm always.

``--with-training-state`` (``--to hf``, from a Composer checkpoint or run folder): beside the HF
model, AdamW's state in ``optimizer.safetensors`` (HF names, written tensor by tensor),
``training_state.json`` (tokens seen, lr and schedule, data mix and position, tokenizer, recipe)
and a model card ``README.md`` with the command that continues it (``models/training_state.py``).
A run started with ``init_from`` of it continues exactly as from the Composer checkpoint.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common import cli
from common.io import atomic_dir, check_output_path
from models.checkpoint_io import is_uri, read_weights, remote_exists, resolve, staged, upload_dir
from models.hf_interop import export_hf, export_mamba_ssm
from models.training_state import write_training_state

FORMATS = ("hf", "mamba_ssm")


def export(
    source: str,
    to: str,
    out: str,
    tokenizer: str | None = None,
    overwrite: bool = False,
    with_training_state: bool = False,
    trust: bool = False,
) -> str:
    """Export ``source`` to ``out`` in format ``to``; returns ``out``.

    ``source`` is verified and read as data (``trust``: full pickle; see models/checkpoint_reader.py).
    """
    if to not in FORMATS:
        raise cli.UserError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    check_output_path(out, "--out", overwrite)
    if with_training_state:
        if to != "hf":
            raise cli.UserError("--with-training-state writes beside an HF export: use it with --to hf")
        return _export_with_training_state(source, out, tokenizer, overwrite, trust)
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
    if to == "hf" and not tokenizer and weights.special_token_ids is None:
        raise cli.UserError(
            f"{weights.source} does not record its tokenizer's special-token ids (bos/eos/pad) and no tokenizer "
            "is reachable: pass --tokenizer DIR (the tokenizer the model was trained with), so config.json "
            "states them instead of transformers' defaults"
        )
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local_out = Path(tmp) / "model" if remote_out else Path(out)
        if to == "hf":
            with staged(tokenizer) if tokenizer else contextlib.nullcontext() as tok_dir:
                export_hf(
                    model,
                    local_out,
                    tokenizer_dir=tok_dir,
                    overwrite=overwrite,
                    special_token_ids=weights.special_token_ids,
                )
        else:
            export_mamba_ssm(model, local_out, overwrite=overwrite)
        if remote_out:
            upload_dir(local_out, out.rstrip("/"))
    print(f"[export] {weights.source} ({weights.format}) -> {out} ({to})")
    return out


def _export_with_training_state(
    source: str, out: str, tokenizer: str | None, overwrite: bool, trust: bool
) -> str:
    """The HF export plus AdamW's state, ``training_state.json`` and the model card, all or nothing.

    The checkpoint is staged once (downloaded when remote) and read twice: its weights, then its
    optimizer state one tensor at a time. Everything is written in a temporary folder, then
    renamed onto ``out`` (local) or uploaded with ``config.json`` last (object store).
    """
    remote_out = is_uri(out)
    if remote_out and not overwrite and remote_exists(f"{out.rstrip('/')}/config.json"):
        raise FileExistsError(f"{out} already holds a model (config.json); pass --overwrite to replace it")
    if not remote_out and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    resolved = resolve(source)
    label = str(source) if resolved == str(source).rstrip("/") else f"{source} ({resolved})"
    with staged(resolved) as checkpoint, tempfile.TemporaryDirectory(prefix="export-") as tmp:
        weights = read_weights(checkpoint, trust=trust)
        if not weights.format.startswith("composer"):
            raise cli.UserError(
                f"{label}: --with-training-state needs a Composer checkpoint or run folder of this repository; "
                f"an {weights.format} directory carries no optimizer state"
            )
        weights.source = label
        tok = _usable_tokenizer(tokenizer, weights.tokenizer)
        if not tok and weights.special_token_ids is None:
            raise cli.UserError(
                f"{label} does not record its tokenizer's special-token ids (bos/eos/pad) and no tokenizer "
                "is reachable: pass --tokenizer DIR (the tokenizer the model was trained with)"
            )
        special = weights.special_token_ids
        target = Path(tmp) / "model" if remote_out else Path(out)
        with atomic_dir(target, overwrite=overwrite) as staging:
            with staged(tok) if tok else contextlib.nullcontext() as tok_dir:
                export_hf(
                    weights.build(), staging, tokenizer_dir=tok_dir, overwrite=True, special_token_ids=special
                )
            del weights
            info = write_training_state(checkpoint, label, staging, out, trust)
        if remote_out:
            upload_dir(target, out.rstrip("/"))
    print(
        f"[export] {label} -> {out} (hf, with training state: {info['checkpoint']}, "
        f"{info['tokens_seen']} tokens seen, lr {info['lr']})"
    )
    return out


def _usable_tokenizer(tokenizer: str | None, recorded: str) -> str | None:
    tokenizer = tokenizer or recorded or None
    if tokenizer and not is_uri(tokenizer) and not Path(tokenizer).is_dir():
        if recorded == tokenizer:  # recorded by a run on another machine: not an error to lack it
            print(
                f"[export] the run's tokenizer {tokenizer} is not here; exporting without one (--tokenizer DIR)"
            )
            return None
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such directory")
    return tokenizer


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
