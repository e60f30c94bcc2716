"""Where evaluation gets a model from: one function, ``load_source``.

A source is anything ``models.checkpoint_io.read_weights`` reads, local or on an object store:

- a training run folder (``run.json`` + ``checkpoints/``): its latest checkpoint, or the one
  ``checkpoint`` names, with the run's config, tokenizer and data;
- a Composer checkpoint, monolithic (``RUN/checkpoints/ep0-ba150-rank0.pt``) or sharded (an FSDP
  folder with ``.metadata``); the checkpoint records its model config and tokenizer;
- an HF transformers (``MambaForCausalLM`` / ``Mamba2ForCausalLM``) or mamba_ssm folder; its
  tokenizer is the folder itself when it holds ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.cli import UserError
from common.config import config_from_dict
from models.checkpoint_io import is_uri, read_weights, resolve
from models.checkpoint_reader import CorruptCheckpoint, UntrustedCheckpoint
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, fp32, CPU) and what came with it."""

    model: MambaLMHeadModel
    tokenizer: str | None  # a tokenizer folder, when the source names or holds one
    run_config: TrainConfig | None  # the training config, for a run folder or a checkpoint inside one
    checkpoint: str  # the file or folder the weights were read from
    tokens_trained: int | None  # the token count of a monolithic Composer checkpoint


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved training config a run saved in ``run.json``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run folder?")
    config = json.loads(path.read_text())["config"]
    # Reading a run needs none of its training-only extras: its loggers (whose packages, such as
    # mlflow, may be missing here) are dropped before the config's checks.
    config["loggers"] = {}
    return config_from_dict(TrainConfig, config, source=str(path))


def _run_dir_of(path: Path) -> Path | None:
    """The run folder holding ``path`` (RUN, RUN/checkpoints/x, RUN/checkpoints/pre-decay/x), if any."""
    for folder in (path, *path.parents[:3]):
        if (folder / "run.json").is_file():
            return folder
    return None


def load_source(source: str | Path, checkpoint: str | Path | None = None, trust: bool = False) -> LoadedModel:
    """A model from a run folder, a Composer checkpoint, or an HF / mamba_ssm folder (see module doc).

    ``checkpoint`` picks a checkpoint of a run folder (default: its latest). The checkpoint is
    verified and read once, as data unless ``trust`` (``--trust-checkpoint``): see
    ``models.checkpoint_reader``.
    """
    text = str(source)
    if not is_uri(text) and not Path(text).exists():
        raise FileNotFoundError(f"{text} does not exist: pass a run folder, a checkpoint, or an HF folder")
    run_dir = None if is_uri(text) else _run_dir_of(Path(text))
    if checkpoint is not None and (run_dir is None or Path(text) != run_dir):
        raise UserError(
            f"--checkpoint applies to a run folder; {text} is not one (pass the checkpoint itself)"
        )
    target = str(checkpoint) if checkpoint is not None else text
    try:
        weights = read_weights(target, trust=trust)
    except (CorruptCheckpoint, UntrustedCheckpoint):
        raise
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    except (
        Exception
    ) as exc:  # an object store's errors (credentials, network, missing key) come in many types
        if not is_uri(target):
            raise
        raise UserError(f"cannot read {target} ({type(exc).__name__}: {exc})") from exc
    run_cfg = load_run_config(run_dir) if run_dir is not None else None
    local = None if is_uri(target) else Path(resolve(target))
    tokenizer = weights.tokenizer or (run_cfg.tokenizer if run_cfg else "")
    if not tokenizer and local is not None and (local / "tokenizer.json").is_file():
        tokenizer = str(local)
    return LoadedModel(
        weights.build().eval(), tokenizer or None, run_cfg, weights.source, weights.tokens_trained
    )
