"""Every bad input gets one clear line, before anything is written (issue 17, section 6).

Each case calls a command-line entry point in this process, as its ``__main__`` does
(``common.cli.run(main, argv)``), and checks the contract of ``common/cli.py``: the exit status
(2 for a mistake, 3 for a fault), one ``error:`` / ``stopped:`` line (one per problem when a
config has several) that names the key, file or flag and says what to do, no traceback, and
nothing written where the command was told to write.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common import cli
from data import convert, demo_corpus, passkey, train_tokenizer
from eval import ablation, harness, needle, report
from recipes import doctor, evaluate, export, inheritune, train
from recipes.config import load_train_config
from tests.conftest import tiny_overrides
from tests.data_helpers import make_docs, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
WSD = str(ROOT / "yamls/tiny/wsd.yaml")
FOOTER = "(run again with --debug for the traceback)"
SCHEDULE = {"scheduler.t_warmup": "1ba", "scheduler.t_decay": "1ba"}


@dataclass
class World:
    """The good inputs each bad one is a variation of, built once for the module."""

    corpus: dict[str, Path]
    run: Path  # a trained two-batch run folder (run.json, checkpoints/)
    checkpoint: Path  # its latest checkpoint
    other_tokenizer: Path  # as many tokens as the run's, other merges
    big_tokenizer: Path  # more tokens than the run's model has rows
    docs: Path  # a JSON Lines source
    files: Path  # bad files made for the cases
    made: dict[str, Path] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Path:
        return self.corpus["tokenizer"]

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.files / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


@pytest.fixture(scope="module")
def world(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    overrides = tiny_overrides(
        corpus,
        root,
        run_name="run",
        max_duration="2ba",
        eval_interval="null",
        **{"scheduler.t_warmup": "1ba", "scheduler.t_decay": "1ba", "checkpoint.save_interval": "2ba"},
    )
    trainer = train.build_trainer(train.prepare_run(load_train_config([WSD], overrides)))
    trainer.fit()
    trainer.close()
    run = root / "run"
    files = root / "files"
    files.mkdir()
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in make_docs(60, seed=3)])
    # The same recipe of texts, another size: other merges; and more rows than the model's 300.
    other = make_tokenizer(root / "tok-other", vocab_size=299)
    big = make_tokenizer(root / "tok-big", vocab_size=420)
    return World(corpus, run, run / "checkpoints" / "latest-rank0.pt", other, big, docs, files)


def call(main: Callable, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of ``main(argv)`` run as its command line runs it."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.run(main, [str(a) for a in argv])
    torch.set_num_threads(threads)  # recipes/train.py sizes this process's threads
    return int(info.value.code or 0), capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The cases: (entry point, argv from the world and an empty output folder, exit status, words the
# line must hold, and the output that must not exist afterwards).


@dataclass
class Case:
    id: str
    main: Callable
    argv: Callable[[World, Path], list]
    code: int
    says: tuple[str, ...]
    problems: int = 1


def _train(*extra: str) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        return [WSD, *tiny_overrides(w.corpus, out, run_name="r", **SCHEDULE), *extra]

    return argv


def _train_with(make: Callable[[World], list]) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        return [*_train()(w, out), *make(w)]

    return argv


def _yaml(name: str, text: str) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        recipe = w.file(name, text)
        return [recipe, *tiny_overrides(w.corpus, out, run_name="r", **SCHEDULE)]

    return argv


def _corrupt(w: World) -> Path:
    """A copy of the run's checkpoint with one bit of its largest tensor flipped."""
    dest = w.files / "flipped-rank0.pt"
    dest.write_bytes(w.checkpoint.read_bytes())
    with zipfile.ZipFile(dest) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with dest.open("r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 1]))
    return dest


def _truncated(w: World) -> Path:
    data = w.checkpoint.read_bytes()
    return w.file("cut-rank0.pt", data[: len(data) // 2])


def _text_checkpoint(w: World) -> Path:
    return w.file("notes.txt", "these are my notes, not a checkpoint\n")


def _bad_tokenizer(w: World) -> Path:
    folder = w.files / "tok-corrupt"
    shutil.copytree(w.tokenizer, folder, dirs_exist_ok=True)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return folder


def _zst(w: World, cut: bool) -> Path:
    import zstandard

    data = zstandard.ZstdCompressor().compress(w.docs.read_bytes())
    return w.file(f"docs{'-cut' if cut else ''}.jsonl.zst", data[: len(data) // 2] if cut else data)


def _gz_cut(w: World) -> Path:
    data = gzip.compress(w.docs.read_bytes())
    return w.file("docs-cut.jsonl.gz", data[: len(data) // 2])


def _convert(source: Callable[[World], Path | str], *extra: str) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        return [
            "--source",
            source(w),
            "--tokenizer",
            w.tokenizer,
            "--out",
            out / "mds",
            "--seq-len",
            32,
            *extra,
        ]

    return argv


def _tok(*extra: object, source: Callable[[World], Path] | None = None) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        return [
            "--source",
            (source or (lambda w: w.docs))(w),
            "--out",
            out / "tok",
            "--vocab-size",
            300,
            *extra,
        ]

    return argv


def _evaluate(*extra: object, source: Callable[[World], Path] | None = None) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        src = source(w) if source else w.run
        return [src, "--json", out / "eval.json", "--no-progress", "--max-batches", 1, *extra]

    return argv


def _export(source: Callable[[World], Path], *extra: object) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        return [source(w), "--to", "hf", "--out", out / "hf", *extra]

    return argv


def _a_file(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "taken").write_text("a file, not a folder\n")
    return out / "taken"


def _a_folder(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return out


def _hf_folder_with_corrupt_config(w: World) -> Path:
    folder = w.files / "hf-corrupt"
    shutil.copytree(w.tokenizer, folder, dirs_exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "mamba", ')
    return folder


def _config_a_list(w: World) -> Path:
    folder = w.files / "list-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("[]")
    return folder


def _ablation_root(w: World, evaluation: str) -> Path:
    """A folder of ablation runs whose first run's evaluation.json holds ``evaluation``."""
    root = w.files / f"ablation-{zlib.crc32(evaluation.encode())}"
    (root / "wsd-s0").mkdir(parents=True, exist_ok=True)
    (root / "wsd-s0" / "evaluation.json").write_text(evaluation)
    return root


INHERITUNE = str(ROOT / "yamls/tiny/inheritune.yaml")


def _inheritune(
    *extra: object, reference: Callable[[World], Path] | None = None
) -> Callable[[World, Path], list]:
    def argv(w: World, out: Path) -> list:
        ref = (reference or (lambda w: w.run))(w)
        return [INHERITUNE, *tiny_overrides(w.corpus, out, max_duration="2ba"), "--reference", ref, *extra]

    return argv


CASES = [
    # recipes/train.py: recipes and overrides
    Case(
        "train-yaml-tab", train.main, _yaml("tab.yaml", "base: wsd.yaml\nseed:\t3\n"), 2, ("tab.yaml", "tab")
    ),
    Case("train-yaml-list", train.main, _yaml("list.yaml", "- seed: 3\n"), 2, ("list.yaml", "mapping")),
    Case("train-yaml-missing", train.main, _yaml("x.yaml", "base: nowhere.yaml\n"), 2, ("nowhere.yaml",)),
    Case("train-unknown-key", train.main, _train("optimzer.lr=1e-3"), 2, ("optimzer", "optimizer")),
    Case("train-bad-type", train.main, _train("seed=abc"), 2, ("seed", "abc")),
    Case(
        "train-max-duration-bare",
        train.main,
        _train("max_duration=2"),
        2,
        ("max_duration", "'2'", "ba", "tok", "ep"),
    ),
    Case(
        "train-max-duration-word",
        train.main,
        _train("max_duration=long"),
        2,
        ("max_duration", "'long'", "ba"),
    ),
    Case(
        "train-t-warmup-bare",
        train.main,
        _train("scheduler.t_warmup=5"),
        2,
        ("scheduler.t_warmup", "'5'", "ba"),
    ),
    Case(
        "train-save-interval-bare",
        train.main,
        _train("checkpoint.save_interval=2"),
        2,
        ("checkpoint.save_interval", "'2'", "ba"),
    ),
    Case("train-eval-interval-0", train.main, _train("eval_interval=0ba"), 2, ("eval_interval", "null")),
    Case(
        "train-eval-interval-bare", train.main, _train("eval_interval=4"), 2, ("eval_interval", "'4'", "ba")
    ),
    Case(
        "train-positional-scale-0",
        train.main,
        _train("algorithms.positional_weighting.scale=0"),
        2,
        ("algorithms.positional_weighting", "scale"),
    ),
    Case(
        "train-loss-spike-window-0",
        train.main,
        _train("callbacks.loss_spike.window=0"),
        2,
        ("callbacks.loss_spike", "window"),
    ),
    Case(
        "train-four-mistakes",
        train.main,
        _train(
            "max_duration=2",
            "scheduler.t_warmup=5",
            "algorithms.positional_weighting.scale=0",
            "callbacks.loss_spike.window=0",
        ),
        2,
        ("max_duration", "scheduler.t_warmup", "positional_weighting", "loss_spike"),
        problems=4,
    ),
    Case("train-batch-0", train.main, _train("global_train_batch_size=0"), 2, ("global_train_batch_size",)),
    Case("train-lr-negative", train.main, _train("optimizer.lr=-1"), 2, ("optimizer.lr",)),
    Case(
        "train-unknown-callback",
        train.main,
        _train("callbacks.loss_spikes={}"),
        2,
        ("loss_spikes", "loss_spike"),
    ),
    Case(
        "train-tokenizer-missing", train.main, _train("tokenizer=/nonexistent/tok"), 2, ("/nonexistent/tok",)
    ),
    Case(
        "train-tokenizer-corrupt",
        train.main,
        _train_with(lambda w: [f"tokenizer={_bad_tokenizer(w)}"]),
        2,
        ("tokenizer.json",),
    ),
    Case(
        "train-mixture-missing",
        train.main,
        _train("data.mixture=/nonexistent/mix.yaml"),
        2,
        ("/nonexistent/mix.yaml",),
    ),
    Case(
        "train-run-root-file",
        train.main,
        lambda w, out: [WSD, *tiny_overrides(w.corpus, _a_file(out), run_name="r", **SCHEDULE)],
        2,
        ("run_root", "taken"),
    ),
    Case(
        "train-load-path-text",
        train.main,
        _train_with(lambda w: [f"checkpoint.load_path={_text_checkpoint(w)}"]),
        2,
        ("checkpoint.load_path", "notes.txt", "not a checkpoint"),
    ),
    Case(
        "train-load-path-missing",
        train.main,
        _train("checkpoint.load_path=/nonexistent/ck.pt"),
        2,
        ("checkpoint.load_path", "/nonexistent/ck.pt"),
    ),
    Case(
        "train-load-path-corrupt",
        train.main,
        _train_with(lambda w: [f"checkpoint.load_path={_corrupt(w)}"]),
        3,
        ("checkpoint.load_path", "flipped-rank0.pt", "CRC-32"),
    ),
    Case(
        "train-load-path-truncated",
        train.main,
        _train_with(lambda w: [f"checkpoint.load_path={_truncated(w)}"]),
        3,
        ("checkpoint.load_path", "cut-rank0.pt", "truncated"),
    ),
    Case(
        "train-init-from-corrupt",
        train.main,
        _train_with(lambda w: [f"init_from.path={_corrupt(w)}"]),
        3,
        ("flipped-rank0.pt", "CRC-32"),
    ),
    Case(
        "train-init-from-text",
        train.main,
        _train_with(lambda w: [f"init_from.path={_text_checkpoint(w)}"]),
        2,
        ("notes.txt", "not a checkpoint"),
    ),
    Case(
        "train-init-from-missing",
        train.main,
        _train("init_from.path=/nonexistent/ck.pt"),
        2,
        ("/nonexistent/ck.pt",),
    ),
    # recipes.evaluate
    Case("evaluate-missing", evaluate.main, _evaluate(source=lambda w: w.files / "nowhere"), 2, ("nowhere",)),
    Case(
        "evaluate-text-checkpoint",
        evaluate.main,
        _evaluate(source=_text_checkpoint),
        2,
        ("notes.txt", "not a checkpoint"),
    ),
    Case("evaluate-corrupt", evaluate.main, _evaluate(source=_corrupt), 3, ("flipped-rank0.pt", "CRC-32")),
    Case("evaluate-truncated", evaluate.main, _evaluate(source=_truncated), 3, ("cut-rank0.pt", "truncated")),
    Case("evaluate-batch-size-0", evaluate.main, _evaluate("--batch-size", 0), 2, ("--batch-size", "0")),
    Case("evaluate-max-batches-0", evaluate.main, _evaluate("--max-batches", 0), 2, ("--max-batches",)),
    Case("evaluate-bad-buckets", evaluate.main, _evaluate("--buckets", "0,x"), 2, ("--buckets",)),
    Case("evaluate-device", evaluate.main, _evaluate("--device", "tpu"), 2, ("--device",)),
    Case(
        "evaluate-tokenizer-missing",
        evaluate.main,
        _evaluate("--tokenizer", "/nonexistent/tok"),
        2,
        ("/nonexistent/tok",),
    ),
    Case(
        "evaluate-tokenizer-corrupt",
        evaluate.main,
        lambda w, out: [*_evaluate()(w, out), "--tokenizer", _bad_tokenizer(w)],
        2,
        ("tokenizer.json",),
    ),
    Case(
        "evaluate-tokenizer-too-big",
        evaluate.main,
        lambda w, out: [*_evaluate()(w, out), "--tokenizer", w.big_tokenizer],
        2,
        ("--tokenizer", "420", "300"),
    ),
    Case(
        "evaluate-tokenizer-other",
        evaluate.main,
        lambda w, out: [*_evaluate()(w, out), "--tokenizer", w.other_tokenizer],
        2,
        ("--tokenizer", "tok-other"),
    ),
    Case(
        "evaluate-data-missing",
        evaluate.main,
        _evaluate("--data", "/nonexistent/mds"),
        2,
        ("--data", "/nonexistent/mds"),
    ),
    Case("evaluate-phase-missing", evaluate.main, _evaluate("--phase", "nophase"), 2, ("nophase",)),
    Case(
        "evaluate-json-in-a-file",
        evaluate.main,
        lambda w, out: [*_evaluate()(w, out), "--json", _a_file(out) / "eval.json"],
        2,
        ("--json", "taken"),
    ),
    # recipes.export
    Case("export-missing", export.main, _export(lambda w: w.files / "nowhere"), 2, ("nowhere",)),
    Case("export-text", export.main, _export(_text_checkpoint), 2, ("notes.txt", "not a checkpoint")),
    Case("export-corrupt", export.main, _export(_corrupt), 3, ("flipped-rank0.pt", "CRC-32")),
    Case("export-truncated", export.main, _export(_truncated), 3, ("cut-rank0.pt", "truncated")),
    Case(
        "export-model-config-a-list",
        export.main,
        _export(_config_a_list),
        2,
        ("config.json", "not a JSON object"),
    ),
    Case(
        "export-out-a-file",
        export.main,
        lambda w, out: [w.run, "--to", "hf", "--out", _a_file(out)],
        2,
        ("--out", "taken"),
    ),
    Case(
        "export-out-under-a-file",
        export.main,
        lambda w, out: [w.run, "--to", "hf", "--out", _a_file(out) / "hf"],
        2,
        ("--out", "taken"),
    ),
    Case(
        "export-tokenizer-missing",
        export.main,
        _export(lambda w: w.run, "--tokenizer", "/nonexistent/tok"),
        2,
        ("--tokenizer", "/nonexistent/tok"),
    ),
    Case(
        "export-state-mamba-ssm",
        export.main,
        lambda w, out: [w.run, "--to", "mamba_ssm", "--out", out / "m", "--with-training-state"],
        2,
        ("--with-training-state", "--to hf"),
    ),
    # data.convert
    Case(
        "convert-zst-truncated",
        convert.main,
        _convert(lambda w: _zst(w, cut=True)),
        3,
        ("docs-cut.jsonl.zst", "truncated"),
    ),
    Case("convert-gz-truncated", convert.main, _convert(_gz_cut), 3, ("docs-cut.jsonl.gz", "truncated")),
    Case(
        "convert-shard-size",
        convert.main,
        _convert(lambda w: w.docs, "--shard-size", "abc"),
        2,
        ("--shard-size", "abc"),
    ),
    Case(
        "convert-source-missing", convert.main, _convert(lambda w: w.files / "none.jsonl"), 2, ("none.jsonl",)
    ),
    Case(
        "convert-tokenizer-corrupt",
        convert.main,
        lambda w, out: ["--source", w.docs, "--tokenizer", _bad_tokenizer(w), "--out", out / "mds"],
        2,
        ("tokenizer.json",),
    ),
    Case(
        "convert-out-a-file",
        convert.main,
        lambda w, out: ["--source", w.docs, "--tokenizer", w.tokenizer, "--out", _a_file(out)],
        2,
        ("--out", "taken"),
    ),
    Case(
        "convert-out-under-a-file",
        convert.main,
        lambda w, out: ["--source", w.docs, "--tokenizer", w.tokenizer, "--out", _a_file(out) / "mds"],
        2,
        ("--out", "taken"),
    ),
    Case("convert-seq-len-0", convert.main, _convert(lambda w: w.docs, "--seq-len", "0"), 2, ("--seq-len",)),
    Case(
        "convert-val-fraction",
        convert.main,
        _convert(lambda w: w.docs, "--val-fraction", "1.5"),
        2,
        ("--val-fraction",),
    ),
    Case(
        "convert-bad-json",
        convert.main,
        _convert(lambda w: w.file("bad.jsonl", '{"text": "a"}\n{"text": \n')),
        2,
        ("bad.jsonl", "2"),
    ),
    Case(
        "convert-wrong-field",
        convert.main,
        _convert(lambda w: w.file("f.jsonl", '{"body": "a"}\n')),
        2,
        ("f.jsonl", "text_field"),
    ),
    # data.train_tokenizer
    Case("tokenizer-max-bytes-0", train_tokenizer.main, _tok("--max-bytes", 0), 2, ("--max-bytes",)),
    Case(
        "tokenizer-vocab-huge",
        train_tokenizer.main,
        _tok("--vocab-size", 1_000_000_000),
        2,
        ("--vocab-size", "1000000000"),
    ),
    Case("tokenizer-vocab-tiny", train_tokenizer.main, _tok("--vocab-size", 10), 2, ("--vocab-size", "260")),
    Case(
        "tokenizer-source-missing",
        train_tokenizer.main,
        _tok(source=lambda w: w.files / "none.jsonl"),
        2,
        ("none.jsonl",),
    ),
    Case(
        "tokenizer-zst-truncated",
        train_tokenizer.main,
        _tok(source=lambda w: _zst(w, cut=True)),
        3,
        ("docs-cut.jsonl.zst", "truncated"),
    ),
    Case(
        "tokenizer-out-a-file",
        train_tokenizer.main,
        lambda w, out: ["--source", w.docs, "--out", _a_file(out), "--vocab-size", 300],
        2,
        ("--out", "taken"),
    ),
    Case(
        "tokenizer-out-under-a-file",
        train_tokenizer.main,
        lambda w, out: ["--source", w.docs, "--out", _a_file(out) / "tok", "--vocab-size", 300],
        2,
        ("--out", "taken"),
    ),
    # eval.needle
    Case(
        "needle-empty-haystack",
        needle.main,
        lambda w, out: [
            w.run,
            "--haystack",
            w.file("empty.txt", ""),
            "--out",
            out / "needle",
            "--lengths",
            "200",
        ],
        2,
        ("empty.txt", "empty"),
    ),
    Case(
        "needle-haystack-missing",
        needle.main,
        lambda w, out: [
            w.run,
            "--haystack",
            w.files / "none.txt",
            "--out",
            out / "needle",
            "--lengths",
            "200",
        ],
        2,
        ("none.txt",),
    ),
]


CASES += [
    # data.passkey
    Case(
        "passkey-empty-haystack",
        passkey.main,
        lambda w, out: ["--haystack", w.file("empty.txt", ""), "--out", out / "pk"],
        2,
        ("empty.txt", "empty"),
    ),
    Case(
        "passkey-max-number-0",
        passkey.main,
        lambda w, out: ["--filler", "--out", out / "pk", "--max-number", 0],
        2,
        ("--max-number",),
    ),
    Case(
        "passkey-count-0",
        passkey.main,
        lambda w, out: ["--haystack", w.docs, "--out", out / "pk", "--count", 0],
        2,
        ("--count",),
    ),
    Case(
        "passkey-words",
        passkey.main,
        lambda w, out: ["--haystack", w.docs, "--out", out / "pk", "--min-words", 50, "--max-words", 10],
        2,
        ("--min-words", "--max-words"),
    ),
    Case(
        "passkey-out-a-file",
        passkey.main,
        lambda w, out: ["--haystack", w.docs, "--out", _a_file(out)],
        2,
        ("--out", "taken"),
    ),
    # eval.report
    Case(
        "report-missing-run",
        report.main,
        lambda w, out: [w.files / "norun", "--out", out / "report"],
        2,
        ("norun",),
    ),
    Case(
        "report-out-a-file", report.main, lambda w, out: [w.run, "--out", _a_file(out)], 2, ("--out", "taken")
    ),
    # eval.harness
    Case("harness-source-missing", harness.main, lambda w, out: [w.files / "norun"], 2, ("norun",)),
    Case(
        "harness-out-a-folder",
        harness.main,
        lambda w, out: [w.run, "--out", _a_folder(out)],
        2,
        ("--out", "folder"),
    ),
    Case(
        "harness-out-under-a-file",
        harness.main,
        lambda w, out: [w.run, "--out", _a_file(out) / "results.json"],
        2,
        ("--out", "taken"),
    ),
    Case(
        "harness-batch-size-0",
        harness.main,
        lambda w, out: [w.run, "--batch-size", 0, "--out", out / "r.json"],
        2,
        ("--batch-size", "0"),
    ),
    Case(
        "harness-batch-size-abc",
        harness.main,
        lambda w, out: [w.run, "--batch-size", "abc"],
        2,
        ("--batch-size", "abc"),
    ),
    Case("harness-limit-negative", harness.main, lambda w, out: [w.run, "--limit", -1], 2, ("--limit", "-1")),
    Case(
        "harness-fewshot-negative",
        harness.main,
        lambda w, out: [w.run, "--num-fewshot", -1],
        2,
        ("--num-fewshot", "-1"),
    ),
    Case("harness-tasks-empty", harness.main, lambda w, out: [w.run, "--tasks", ","], 2, ("--tasks",)),
    Case("harness-device", harness.main, lambda w, out: [w.run, "--device", "tpu"], 2, ("--device", "tpu")),
    Case(
        "harness-hf-config-corrupt",
        harness.main,
        lambda w, out: [_hf_folder_with_corrupt_config(w), "--out", out / "r.json"],
        2,
        ("hf-corrupt", "config.json"),
    ),
    Case("harness-checkpoint-corrupt", harness.main, lambda w, out: [_corrupt(w)], 3, ("flipped-rank0.pt",)),
    Case(
        "harness-checkpoint-missing",
        harness.main,
        lambda w, out: [w.run, "--checkpoint", w.files / "none.pt"],
        2,
        ("none.pt",),
    ),
    Case(
        "harness-tokenizer-missing",
        harness.main,
        lambda w, out: [w.run, "--tokenizer", w.files / "notok"],
        2,
        ("notok",),
    ),
    # eval.ablation
    Case("ablation-root-missing", ablation.main, lambda w, out: [w.files / "noruns"], 2, ("noruns",)),
    Case(
        "ablation-root-a-file",
        ablation.main,
        lambda w, out: [_text_checkpoint(w)],
        2,
        ("notes.txt", "folder"),
    ),
    Case(
        "ablation-evaluation-corrupt",
        ablation.main,
        lambda w, out: [_ablation_root(w, '{"metrics": '), "--seeds", 0, "--variants", "wsd"],
        2,
        ("wsd-s0/evaluation.json", "JSON"),
    ),
    Case(
        "ablation-evaluation-a-list",
        ablation.main,
        lambda w, out: [_ablation_root(w, "[]"), "--seeds", 0, "--variants", "wsd"],
        2,
        ("wsd-s0/evaluation.json", "recipes.evaluate"),
    ),
    Case(
        "ablation-evaluation-without-metrics",
        ablation.main,
        lambda w, out: [_ablation_root(w, '{"tokens_trained": 10}'), "--seeds", 0, "--variants", "wsd"],
        2,
        ("wsd-s0/evaluation.json", "metrics"),
    ),
    Case(
        "ablation-seeds-abc", ablation.main, lambda w, out: [w.files, "--seeds", "abc"], 2, ("--seeds", "abc")
    ),
    Case(
        "ablation-out-a-folder",
        ablation.main,
        lambda w, out: [_ablation_root(w, "{}"), "--out", _a_folder(out)],
        2,
        ("--out", "folder"),
    ),
    Case(
        "ablation-out-under-a-file",
        ablation.main,
        lambda w, out: [_ablation_root(w, "{}"), "--out", _a_file(out) / "ablation.md"],
        2,
        ("--out", "taken"),
    ),
    Case(
        "ablation-unknown-variant",
        ablation.main,
        lambda w, out: [_ablation_root(w, "{}"), "--variants", "nosuch", "--seeds", 0],
        2,
        ("nosuch-s0",),
    ),
    # recipes.inheritune
    Case(
        "inheritune-reference-missing",
        inheritune.main,
        _inheritune(reference=lambda w: w.files / "noref"),
        2,
        ("noref",),
    ),
    Case(
        "inheritune-reference-corrupt",
        inheritune.main,
        _inheritune(reference=_corrupt),
        3,
        ("flipped-rank0.pt",),
    ),
    Case(
        "inheritune-reference-not-a-checkpoint",
        inheritune.main,
        _inheritune(reference=_text_checkpoint),
        2,
        ("notes.txt",),
    ),
    Case("inheritune-grow-by-0", inheritune.main, _inheritune("--grow-by", 0), 2, ("--grow-by",)),
    Case("inheritune-max-depth", inheritune.main, _inheritune("--max-depth", 9), 2, ("--max-depth", "9")),
    Case(
        "inheritune-start-depth-abc",
        inheritune.main,
        _inheritune("--start-depth", "abc"),
        2,
        ("--start-depth", "abc"),
    ),
    Case(
        "inheritune-max-duration-in-tokens",
        inheritune.main,
        _inheritune("max_duration=1000tok"),
        2,
        ("max_duration", "1000tok", "ba"),
    ),
    Case(
        "inheritune-lr-rewarmup",
        inheritune.main,
        _inheritune("--lr-rewarmup", "abc"),
        2,
        ("lr-rewarmup", "abc"),
    ),
    Case(
        "inheritune-no-recipe",
        inheritune.main,
        lambda w, out: [f"run_root={out}", "--reference", w.run],
        2,
        ("recipe",),
    ),
    Case(
        "inheritune-recipe-missing",
        inheritune.main,
        lambda w, out: [w.files / "nosuch.yaml", f"run_root={out}", "--reference", w.run],
        2,
        ("nosuch.yaml",),
    ),
    Case(
        "inheritune-run-root-a-file",
        inheritune.main,
        lambda w, out: [INHERITUNE, *tiny_overrides(w.corpus, _a_file(out)), "--reference", w.run],
        2,
        ("taken",),
    ),
    # recipes.doctor
    Case("doctor-unknown-flag", doctor.main, lambda w, out: ["--gpu"], 2, ("--gpu",)),
    # data.demo_corpus
    Case("demo-out-missing", demo_corpus.main, lambda w, out: [], 2, ("--out",)),
    Case("demo-out-a-file", demo_corpus.main, lambda w, out: ["--out", _a_file(out)], 2, ("--out", "taken")),
    Case(
        "demo-out-under-a-file",
        demo_corpus.main,
        lambda w, out: ["--out", _a_file(out) / "src"],
        2,
        ("--out", "taken"),
    ),
    Case(
        "demo-out-exists",
        demo_corpus.main,
        lambda w, out: ["--out", _a_folder(out)],
        2,
        ("--out", "--overwrite"),
    ),
    Case(
        "demo-code-mb-negative",
        demo_corpus.main,
        lambda w, out: ["--out", out / "src", "--code-mb", -1],
        2,
        ("--code-mb", "-1"),
    ),
    Case(
        "demo-prose-mb-0",
        demo_corpus.main,
        lambda w, out: ["--out", out / "src", "--prose-mb", 0],
        2,
        ("--prose-mb", "0"),
    ),
    Case(
        "demo-code-mb-abc",
        demo_corpus.main,
        lambda w, out: ["--out", out / "src", "--code-mb", "abc"],
        2,
        ("--code-mb", "abc"),
    ),
    Case(
        "demo-chats-0",
        demo_corpus.main,
        lambda w, out: ["--out", out / "src", "--chats", 0],
        2,
        ("--chats", "0"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_gets_one_clear_line_and_nothing_is_written(
    case: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = case.argv(world, out)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = call(case.main, argv, capsys)
    assert "Traceback" not in err, err[-3000:]
    assert code == case.code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and line != FOOTER]
    lead = "error: " if code == cli.USAGE_ERROR else "stopped: "
    assert lines and lines[0].startswith(lead), err
    if case.problems == 1:
        assert len(lines) == 1, err
    else:
        assert lines[0] == f"{lead}{case.problems} problems in the configuration:", err
        assert len(lines) == 1 + case.problems, err
    for word in case.says:
        assert word in err, (word, err)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, f"written: {set(after) - set(before)}"


# ----------------------------------------------------------------------------------------------
# What runs, and says so: the neighbours of the cases above that are not mistakes.


def test_a_run_that_logged_to_a_logger_missing_here_is_evaluated_and_exported(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading a run needs none of its training-only extras (issue 17: mlflow, missing here)."""
    from callbacks.registry import loggers

    absent = next((entry.name for entry in loggers if entry.missing()), None)
    if absent is None:
        pytest.skip("every logger's package is installed here")
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    record = json.loads((run / "run.json").read_text())
    record["config"]["loggers"] = {absent: {}}
    (run / "run.json").write_text(json.dumps(record))
    code, err = call(
        evaluate.main, [run, "--json", tmp_path / "eval.json", "--no-progress", "--max-batches", 1], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["batches"] == 1
    code, err = call(export.main, [run, "--to", "hf", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_vocabulary_smaller_than_asked_is_named_in_a_warning(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = call(
        train_tokenizer.main,
        ["--source", world.docs, "--out", tmp_path / "tok", "--vocab-size", 60000],
        capsys,
    )
    assert code == 0, err
    size = json.loads((tmp_path / "tok" / "training_report.json").read_text())["vocab_size"]
    assert size < 60000
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning == [warning[0]] and f"{size:,} tokens, not the 60,000 of --vocab-size" in warning[0], err
