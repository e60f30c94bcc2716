"""Evaluate a training run's checkpoint: validation perplexity, top-k accuracy, a generated sample.

    python -m recipes.evaluate runs/demo-decay --prompt "def fibonacci(n):"

Reads the run's resolved config (``run.json``) for the model, tokenizer and data mixture,
loads ``--checkpoint`` (default: the run's latest monolithic checkpoint), evaluates on the
validation split of the run's data phase (unweighted metrics) and decodes a sample
recurrently from ``--prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import cli
from common.config import config_from_dict
from data.loader import build_dataloader
from models.composer_model import ComposerMambaLM
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run directory?")
    return config_from_dict(TrainConfig, json.loads(path.read_text())["config"], source=str(path))


def load_model(cfg: TrainConfig, checkpoint: Path) -> MambaLMHeadModel:
    """The ``MambaLMHeadModel`` weights of a monolithic Composer checkpoint (``*-rank0.pt``)."""
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found (sharded FSDP checkpoints are folders: train with "
            "fsdp.state_dict_type=full, or pass --checkpoint)"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("model."): v for k, v in state["state"]["model"].items()}
    model = MambaLMHeadModel(cfg.model)
    model.load_state_dict(weights)
    return model.eval()


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: MambaLMHeadModel, max_batches: int | None) -> dict[str, float]:
    composer_model = ComposerMambaLM(cfg.model, model)
    metrics = composer_model.get_metrics(is_train=False)
    spec = build_dataloader(cfg.data, cfg.tokenizer, cfg.device_eval_batch_size, split="val")
    for i, batch in enumerate(spec.dataloader):
        if max_batches is not None and i >= max_batches:
            break
        logits = composer_model.eval_forward(batch)
        for metric in metrics.values():
            composer_model.update_metric(batch, logits, metric)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def generate_text(
    cfg: TrainConfig, model: MambaLMHeadModel, prompt: str, max_new_tokens: int, seed: int
) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids,
        max_new_tokens,
        temperature=0.8,
        top_k=40,
        eos_token_id=tok.eos_token_id,
        generator=torch.Generator().manual_seed(seed),
    )
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m recipes.evaluate", __doc__)
    parser.add_argument("run", type=Path, help="run directory (with run.json and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="default: RUN/checkpoints/latest-rank0.pt")
    parser.add_argument("--max-batches", type=int, default=None, help="validation batches (default: all)")
    parser.add_argument("--prompt", default="def ", help="text to continue for the sample")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate for the sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args(argv)
    cfg = load_run_config(args.run)
    model = load_model(cfg, args.checkpoint or args.run / "checkpoints" / "latest-rank0.pt")
    results: dict[str, Any] = evaluate(cfg, model, args.max_batches)
    print(f"validation ({cfg.data.mixture}, phase {cfg.data.phase}):")
    for name, value in results.items():
        print(f"  {name:22s} {value:.4f}")
    sample = generate_text(cfg, model, args.prompt, args.max_new_tokens, args.seed)
    print(f"sample (temperature 0.8, top-k 40):\n{sample}")
    if args.json:
        from common.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({**results, "sample": sample}, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
