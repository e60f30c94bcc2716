"""Where evaluation gets a model from: one function, ``load_source``.

A source is one of

- a training run folder (``run.json`` + ``checkpoints/``): its latest monolithic checkpoint,
  or the one ``checkpoint`` names, with the run's config, tokenizer and data;
- a monolithic Composer checkpoint (``*-rank0.pt``) inside a run folder
  (``RUN/checkpoints/ep0-ba150-rank0.pt``): the run's ``run.json`` gives the config;
- an HF transformers (``MambaForCausalLM`` / ``Mamba2ForCausalLM``) or mamba_ssm folder
  (``config.json`` + weights), read by ``models.hf_interop.load_pretrained``; its tokenizer is
  the folder itself when it holds ``tokenizer.json``.

Sharded (FSDP) checkpoints and object-store URIs are refused with a message that says how to
get a monolithic one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError
from common.config import config_from_dict
from models.hf_interop import load_pretrained
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig

LATEST_CHECKPOINT = "latest-rank0.pt"  # Composer's symlink to a run's newest checkpoint


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode, fp32, CPU) and what came with it."""

    model: MambaLMHeadModel
    tokenizer: str | None  # a tokenizer folder, when the source names or holds one
    run_config: TrainConfig | None  # the training config, for a run folder or checkpoint
    checkpoint: str  # the file or folder the weights were read from
    tokens_trained: int | None  # the checkpoint's token count, when it records one


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved training config a run saved in ``run.json``."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run folder?")
    return config_from_dict(TrainConfig, json.loads(path.read_text())["config"], source=str(path))


def _is_sharded_checkpoint(path: Path) -> bool:
    # torch.distributed.checkpoint writes a folder with a .metadata file and *.distcp shards.
    return path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp")))


def _run_dir_of(checkpoint: Path) -> Path:
    """The run folder holding ``checkpoint`` (RUN/checkpoints/x.pt or RUN/x.pt)."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        if (folder / "run.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no run.json beside or above {checkpoint}: a Composer checkpoint holds weights but not the model "
        "config; evaluate the run folder it belongs to (RUN --checkpoint FILE)"
    )


def _load_composer_checkpoint(cfg: TrainConfig, checkpoint: Path) -> tuple[MambaLMHeadModel, int | None]:
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise UserError(f"{checkpoint} is not a readable Composer checkpoint ({exc})") from exc
    weights = {k.removeprefix("model."): v for k, v in state["model"].items()}
    model = MambaLMHeadModel(cfg.model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if cfg.model.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(
            f"{checkpoint}: weights do not match the run's model config: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    timestamp = state.get("timestamp", {}).get("Timestamp", {})
    tokens = timestamp.get("token")
    return model, int(tokens) if tokens is not None else None


def load_source(source: str | Path, checkpoint: str | Path | None = None) -> LoadedModel:
    """A model from a run folder, a Composer checkpoint, or an HF / mamba_ssm folder (see module doc).

    ``checkpoint`` picks a checkpoint file of a run folder (default: its latest).
    """
    text = str(source)
    if "://" in text:
        raise UserError(
            f"{text}: remote checkpoints are not read here yet; download it first (e.g. with the "
            "object store's CLI) and pass the local file"
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder, a checkpoint, or an HF folder")
    if _is_sharded_checkpoint(path) or (checkpoint is not None and _is_sharded_checkpoint(Path(checkpoint))):
        raise UserError(
            f"{checkpoint or path} is a sharded (FSDP) checkpoint, which evaluation cannot read yet; train "
            "with fsdp.state_dict_type=full for monolithic checkpoints, or pass an HF export"
        )
    if path.is_dir() and (path / "run.json").is_file():
        cfg = load_run_config(path)
        ckpt = Path(checkpoint) if checkpoint is not None else path / "checkpoints" / LATEST_CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{ckpt} not found: the run has no monolithic checkpoint yet (pass one with --checkpoint)"
            )
        model, tokens = _load_composer_checkpoint(cfg, ckpt)
        return LoadedModel(model.eval(), cfg.tokenizer or None, cfg, str(ckpt), tokens)
    if path.is_file():
        if checkpoint is not None:
            raise UserError(f"{path} is a checkpoint file already; --checkpoint applies to run folders")
        cfg = load_run_config(_run_dir_of(path))
        model, tokens = _load_composer_checkpoint(cfg, path)
        return LoadedModel(model.eval(), cfg.tokenizer or None, cfg, str(path), tokens)
    if (path / "config.json").is_file():
        if checkpoint is not None:
            raise UserError(f"{path} is an HF / mamba_ssm folder; --checkpoint applies to run folders")
        model = load_pretrained(path)
        tokenizer = str(path) if (path / "tokenizer.json").is_file() else None
        return LoadedModel(model.eval(), tokenizer, None, str(path), None)
    raise UserError(
        f"{path} is neither a run folder (run.json), a checkpoint file, nor an HF / mamba_ssm folder "
        "(config.json)"
    )
