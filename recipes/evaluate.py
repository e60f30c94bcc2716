"""Evaluate a model on a validation split: cross-entropy, perplexity, top-1/3/10, by position.

    python -m recipes.evaluate runs/demo/stable                                   # a run folder
    python -m recipes.evaluate runs/demo/stable/checkpoints/ep0-ba100-rank0.pt    # one checkpoint
    python -m recipes.evaluate out/hf --data runs/demo/mds/prose --tokenizer runs/demo/tokenizer

The source is a run folder (its latest checkpoint, or --checkpoint), a monolithic Composer
checkpoint inside a run folder, or an HF transformers / mamba_ssm folder (eval/sources.py).
The data is the run's own mixture phase, or --data: a mixture YAML (with --phase) or one
converted stream folder. Every sample of the split is scored (no batch is dropped), unweighted.
Metrics are given for all tokens and per bucket of position in the document (positions restart
after each end-of-text, as in training), as JSON (default for a run folder: RUN/evaluation.json);
the console shows one line over all tokens (``--verbose``: the table by position, the sample as
decoded). On a GPU the forward runs under bf16 autocast; on CPU in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common import cli
from common.config import config_from_dict
from common.io import atomic_write_text, check_output_path
from data.loader import DataConfig, build_dataloader
from data.tokenizer import TokenizerInfo, load_tokenizer, tokenizer_info
from eval.metrics import DEFAULT_BUCKETS, TOP_K, PositionMetrics, bucket_names, format_table, parse_buckets
from eval.sources import LoadedModel, load_source
from models.composer_model import ComposerMambaLM
from models.mamba_lm import MambaLMHeadModel
from recipes.config import TrainConfig

__all__ = ["evaluate", "load_run_config", "main"]

DEFAULT_BATCH_SIZE = 8  # sequences per forward when neither --batch-size nor the run sets one


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


def data_config(
    run: TrainConfig | None, loaded: LoadedModel, data: str | None, phase: str | None, workdir: Path
) -> DataConfig:
    """What to score: --data (a mixture YAML or a converted stream folder), else the run's own data."""
    if data is None:
        if run is None:
            raise cli.UserError(
                f"{loaded.checkpoint} is not a training run: name the data with --data "
                "(a mixture YAML, or a folder written by data.convert)"
            )
        base = run.data  # the run's streams and settings (cache, hashes, remote)
        return dataclasses.replace(base, phase=phase or base.phase)
    path = Path(data)
    if path.is_dir():
        if phase is not None:
            raise cli.UserError(f"--phase applies to a mixture YAML; {path} is a stream folder")
        # One converted stream: a one-stream mixture, written where the dataset can read it.
        mixture = workdir / "mixture.yaml"
        stream = {"local": str(path.resolve())}
        atomic_write_text(mixture, json.dumps({"phases": {"eval": {"streams": {path.name: stream}}}}))
        return DataConfig(mixture=str(mixture), phase="eval", shuffle=False)
    if not path.is_file():
        raise FileNotFoundError(
            f"--data {path} not found: pass a mixture YAML or a data.convert output folder"
        )
    return DataConfig(mixture=str(path), phase=phase or "stable", shuffle=False)


@torch.no_grad()
def evaluate(
    model: MambaLMHeadModel,
    dataloader: Any,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    reset_state_at_doc_boundaries: bool = False,
    progress: bool = True,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Score every batch of ``dataloader`` (at most ``max_batches``): {samples, batches, metrics}.

    Top-k ranks the first ``vocab_size`` logits (default: the model's vocabulary).
    """
    if max_batches is not None and max_batches < 1:
        raise cli.UserError(f"--max-batches {max_batches} must be >= 1 (omit it to score every batch)")
    device = torch.device(device)
    model = model.to(device).eval()
    wrapper = ComposerMambaLM(
        model.config, model, reset_state_at_doc_boundaries=reset_state_at_doc_boundaries
    )
    metrics = PositionMetrics(vocab_size or model.config.vocab_size, buckets, device=device)
    # bf16 autocast on GPU (the training precision there); fp32 on CPU, where bf16 is ~40x slower.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    total = len(dataloader) if max_batches is None else min(max_batches, len(dataloader))
    samples = batches = 0
    bar = tqdm(dataloader, total=total, desc="evaluate", unit="batch", disable=not progress, leave=False)
    for batch in bar:
        if batches == total:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            logits = wrapper(batch)
        metrics.update(logits, batch["labels"], batch["position_ids"])
        samples += int(batch["input_ids"].shape[0])
        batches += 1
    return {"samples": samples, "batches": batches, "metrics": metrics.compute()}


def generate_text(
    model: MambaLMHeadModel, tokenizer: str, prompt: str, max_new_tokens: int, seed: int
) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    device = model.lm_head.weight.device
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
    out = model.generate(
        ids,
        max_new_tokens,
        temperature=0.8,
        top_k=40,
        eos_token_id=tok.eos_token_id,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    return tok.decode(out[0], skip_special_tokens=True)


def _check_tokenizer(given: str | None, info: TokenizerInfo, loaded: LoadedModel) -> None:
    """A ``--tokenizer`` must be the model's own: more tokens than its rows would index past the
    embedding, and other merges score other ids (numbers that mean nothing)."""
    if given is None:
        return
    rows = loaded.model.config.vocab_size
    if info.vocab_size > rows:
        raise cli.UserError(
            f"--tokenizer {given} has {info.vocab_size} tokens, more than the {rows} rows of the model's "
            "embedding: pass the tokenizer the model was trained with"
            + (f" ({loaded.tokenizer}), or omit --tokenizer" if loaded.tokenizer else "")
        )
    own = loaded.tokenizer
    if not own or not Path(own).exists() or Path(own).resolve() == Path(given).resolve():
        return  # the model's own tokenizer is not here to compare with (or is the one given)
    if tokenizer_info(load_tokenizer(own)).fingerprint != info.fingerprint:
        raise cli.UserError(
            f"--tokenizer {given} is not the tokenizer the model was trained with ({own}): its ids "
            "mean other text, so every score would be meaningless; omit --tokenizer"
        )


def summary_line(
    source: str, tokens_trained: int | None, result: dict[str, Any], split: str, out: str | Path | None
) -> str:
    """The evaluation in one line, e.g. ``eval runs/demo/stable @1,105,920 tokens: loss 4.3905, ppl
    80.68, top1 0.2335, top3 0.3700, top10 0.5172 (133 val samples; by position: RUN/evaluation.json)``."""
    m = result["metrics"]["all"]
    at = f" @{tokens_trained:,} tokens" if tokens_trained is not None else ""
    scores = ", ".join(
        [f"loss {_number(m['cross_entropy'], 4)}", f"ppl {_number(m['perplexity'], 2)}"]
        + [f"top{k} {_number(m[f'top{k}'], 4)}" for k in TOP_K]
    )
    where = f"by position: {out}" if out is not None else "by position: --verbose or --json"
    return f"eval {source}{at}: {scores} ({result['samples']} {split} samples; {where})"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m recipes.evaluate", __doc__)
    parser.add_argument(
        "source", help="a run folder, a Composer checkpoint (*-rank0.pt), or an HF / mamba_ssm folder"
    )
    parser.add_argument("--checkpoint", help="a checkpoint file of the run folder (default: its latest)")
    parser.add_argument(
        "--data", help="a mixture YAML or a data.convert stream folder (default: the run's data)"
    )
    parser.add_argument("--phase", help="the mixture phase to score (default: the run's phase, or 'stable')")
    parser.add_argument("--split", default="val", choices=["val", "train"], help="the split to score")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run's, or the HF folder's own)")
    parser.add_argument(
        "--batch-size", type=int, help="sequences per forward (default: the run's eval batch, else 8)"
    )
    parser.add_argument(
        "--max-batches", type=int, help="score at most this many batches (default: every batch)"
    )
    parser.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                        help="starts of the position buckets (positions within each document)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument(
        "--json", help="write the results here (default for a run folder: RUN/evaluation.json)"
    )
    parser.add_argument("--prompt", help="also decode a sample from this prompt (temperature 0.8, top-k 40)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the sample")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the sample")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print the metrics by position as a table and the sample as decoded (default: one line each)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read a Composer checkpoint with full pickle (it can run code); only for a source you trust",
    )
    args = parser.parse_args(argv)

    buckets = parse_buckets(args.buckets)
    device = cli.resolve_device(args.device)
    for flag, value in (("--batch-size", args.batch_size), ("--max-batches", args.max_batches)):
        if value is not None and value < 1:
            raise cli.UserError(f"{flag} {value} must be >= 1 (omit it for the default)")
    if args.json is not None:
        check_output_path(args.json, "--json", overwrite=True, folder=False)
    loaded = load_source(args.source, args.checkpoint, trust=args.trust_checkpoint)
    tokenizer = args.tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise cli.UserError(
            f"{args.source} holds no tokenizer: pass --tokenizer (the one the data was converted with)"
        )
    info = tokenizer_info(load_tokenizer(tokenizer))
    _check_tokenizer(args.tokenizer, info, loaded)
    run = load_run_config(loaded.run_dir) if loaded.run_dir is not None else None
    # An HF export records the padded vocabulary as its vocab_size; the tokenizer knows the real one,
    # and top-k must not rank the padding rows of the head.
    vocab_size = min(loaded.model.config.vocab_size, info.vocab_size)
    batch_size = args.batch_size or (run.device_eval_batch_size if run else DEFAULT_BATCH_SIZE)
    with tempfile.TemporaryDirectory() as workdir:
        cfg = data_config(run, loaded, args.data, args.phase, Path(workdir))
        spec = build_dataloader(cfg, tokenizer, batch_size, split=args.split)
        result = evaluate(
            loaded.model,
            spec.dataloader,
            buckets,
            args.max_batches,
            device,
            reset_state_at_doc_boundaries=bool(run and run.reset_state_at_doc_boundaries),
            progress=not args.no_progress,
            vocab_size=vocab_size,
        )
        del spec  # release the dataset's shared memory before its mixture file goes
    if args.verbose:
        print(f"{loaded.checkpoint}: {cfg.mixture if args.data is None else args.data} (phase {cfg.phase}, "
              f"split {args.split}), {result['samples']} samples in {result['batches']} batches")  # fmt: skip
        print(format_table(result["metrics"]))
    report: dict[str, Any] = {
        "source": str(args.source),
        "checkpoint": loaded.checkpoint,
        "tokens_trained": loaded.tokens_trained,
        "data": args.data or cfg.mixture,
        "phase": cfg.phase,
        "split": args.split,
        "buckets": bucket_names(buckets),
        **result,
    }
    if args.prompt is not None:
        report["sample"] = generate_text(loaded.model, tokenizer, args.prompt, args.max_new_tokens, args.seed)
    out = args.json or (Path(args.source) / "evaluation.json" if run and Path(args.source).is_dir() else None)
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    if args.verbose:
        if "sample" in report:
            print(f"sample (temperature 0.8, top-k 40):\n{report['sample']}")
        if out is not None:
            print(f"wrote {out}")
        return
    print(summary_line(args.source, loaded.tokens_trained, result, args.split, out))
    if "sample" in report:
        print(f"sample (temperature 0.8, top-k 40): {report['sample']!r}")


if __name__ == "__main__":
    cli.run(main)
