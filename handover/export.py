"""Export: a run or checkpoint handed on as an HF transformers or mamba_ssm directory, local or on
an object store, optionally with its training state (``recipes/export.py`` is the command line).

The source is verified and read once (``handover.weights.read_weights``); the directory is
written under a temporary name and renamed (or uploaded with ``config.json`` last), so an
interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from common import cli
from common.io import atomic_dir, check_output_path
from handover.hf_mamba import export_hf
from handover.mamba_ssm import export_mamba_ssm
from handover.training_state import write_training_state
from handover.weights import is_uri, read_weights, remote_exists, resolve, staged, upload_dir

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

    ``source`` is verified and read as data (``trust``: full pickle; see handover/reader.py).
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
