"""lm-eval (EleutherAI's evaluation harness) on a model of this repository, offline.

    python -m eval.harness runs/demo/stable --tasks mamba_recipes_tiny_mc
    python -m eval.harness out/hf --tasks hellaswag --num-fewshot 10 --batch-size 8   # data in the HF cache

The source is anything ``eval.sources`` reads (run folder, Composer checkpoint, HF / mamba_ssm
folder); unless it is already an HF folder, it is exported first (``handover.hf_mamba.export_hf``,
with the tokenizer) into a temporary folder, which lm-eval's HF backend (``HFLM``:
``AutoModelForCausalLM`` loads ``MambaForCausalLM`` / ``Mamba2ForCausalLM``, or
``BambaForCausalLM`` for a hybrid of attention layers and MLPs) then evaluates. A hybrid that
Bamba's layout cannot hold is refused by the export, naming the setting.

Tasks are lm-eval's own plus those in ``eval/tasks/`` (a tiny local multiple-choice task that
needs no download). HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set unless ``--online``: a task
whose data is not in the local HF cache then fails instead of downloading. Writes the results
as JSON (``--out``) and prints lm-eval's table.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import cli
from common.io import atomic_write_text, check_output_path, read_json_object

TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_TASK = "mamba_recipes_tiny_mc"


def hf_folder(source: str, checkpoint: str | None, tokenizer: str | None, workdir: Path) -> Path:
    """An HF folder for ``source``: itself when it is one with a tokenizer, else a fresh export."""
    path = Path(source)
    config = path / "config.json"
    if (
        checkpoint is None
        and config.is_file()
        and "model_type"
        in read_json_object(config, "a JSON object of model settings", "save the model folder again")
    ):
        if tokenizer is not None or not (path / "tokenizer.json").is_file():
            raise cli.UserError(
                f"{path} is an HF folder; lm-eval reads its tokenizer from it: save one there"
            )
        return path
    from eval.sources import load_source
    from handover.hf_mamba import export_hf

    loaded = load_source(source, checkpoint)
    tokenizer = tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise cli.UserError(f"{source} holds no tokenizer: pass --tokenizer")
    return export_hf(loaded.model, workdir / "hf", tokenizer_dir=tokenizer, overwrite=True)


def run_lm_eval(
    hf_dir: str | Path,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    limit: int | None = None,
    offline: bool = True,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with the HF backend on ``hf_dir``; returns its results dict."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise cli.UserError(f"unknown lm-eval task(s) {unknown}; local tasks: {LOCAL_TASK} (eval/tasks/)")
    results = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32"},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    if results is None:  # lm-eval returns None on non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser("python -m eval.harness", __doc__)
    parser.add_argument("source", help="a run folder, a Composer checkpoint, or an HF / mamba_ssm folder")
    parser.add_argument("--tasks", default=LOCAL_TASK, help="comma-separated lm-eval task names")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    parser.add_argument("--limit", type=int, help="at most this many documents per task (a quick check)")
    parser.add_argument("--checkpoint", help="a checkpoint file of the run folder (default: its latest)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument("--out", help="write lm-eval's results here as JSON")
    parser.add_argument("--online", action="store_true", help="let lm-eval download task data")
    args = parser.parse_args(argv)

    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise cli.UserError("--tasks is empty: name at least one task")
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 1),
        ("--num-fewshot", args.num_fewshot, 0),
    ):
        if value is not None and value < least:
            raise cli.UserError(f"{flag} {value} must be >= {least} (omit it for the default)")
    if args.out:
        check_output_path(args.out, "--out", overwrite=True, folder=False)
    device = str(cli.resolve_device(args.device))
    with tempfile.TemporaryDirectory() as workdir:
        hf_dir = hf_folder(args.source, args.checkpoint, args.tokenizer, Path(workdir))
        results = run_lm_eval(
            hf_dir, tasks, args.num_fewshot, args.batch_size, device, args.limit, offline=not args.online
        )
    print(make_table(results))
    if args.out:
        keep = {k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results}
        atomic_write_text(args.out, json.dumps({"source": args.source, **keep}, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
