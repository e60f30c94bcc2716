"""recipes/evaluate.py: every number recomputed in float64, every sample scored, every source read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data.shared_memory import clean_stale_shared_memory
from data.sources import SourceSpec
from eval.metrics import PositionMetrics, bucket_names
from eval.sources import load_source
from handover.hf_mamba import export_hf
from handover.mamba_ssm import export_mamba_ssm
from models.config import preset
from models.mamba_lm import MambaLMHeadModel
from recipes import evaluate
from recipes.config import load_train_config
from recipes.train import build_trainer, prepare_run
from tests.data_helpers import (
    convert_sources,
    make_docs,
    make_tokenizer,
    single_stream_dataset,
    write_jsonl,
    write_mixture,
)

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = (0, 4, 16, 1000)  # the last is beyond seq 32 with short documents: an empty bucket
VOCAB = 300


@pytest.fixture(autouse=True)
def _clean_shm() -> None:
    clean_stale_shared_memory()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_corpus")
    tok = make_tokenizer(root / "tok", vocab_size=VOCAB)
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in make_docs(300, seed=3)])
    convert_sources(root / "stream", tok, [SourceSpec(path=str(docs))], seq_len=32, val_fraction=0.25)
    return {"root": root, "tokenizer": tok, "stream": root / "stream"}


def val_samples(stream: Path) -> int:
    """The number of validation samples, from the shards' own index."""
    index = json.loads((stream / "val" / "index.json").read_text())
    return sum(shard["samples"] for shard in index["shards"])


def reference_metrics(model: MambaLMHeadModel, batches: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Float64, token by token: cross-entropy over the padded vocabulary, top-k ranks over the real one."""
    model64 = MambaLMHeadModel(model.config).double()
    model64.load_state_dict(model.state_dict())
    names = bucket_names(BUCKETS)
    sums = {name: {"ce": 0.0, "n": 0, 1: 0, 3: 0, 10: 0} for name in ["all", *names]}
    with torch.no_grad():
        for batch in batches:
            logits = model64(batch["input_ids"])
            for b in range(logits.shape[0]):
                for t in range(logits.shape[1]):
                    label = int(batch["labels"][b, t])
                    if label == -100:
                        continue
                    row = logits[b, t].tolist()
                    top = max(row)
                    ce = math.log(sum(math.exp(x - top) for x in row)) + top - row[label]
                    rank = sum(x > row[label] for x in row[:VOCAB])  # better real tokens than the label
                    pos = int(batch["position_ids"][b, t])
                    bucket = names[max(i for i, start in enumerate(BUCKETS) if pos >= start)]
                    for group in ("all", bucket):
                        s = sums[group]
                        s["ce"] += ce
                        s["n"] += 1
                        for k in (1, 3, 10):
                            s[k] += rank < k
    out = {}
    for name, s in sums.items():
        if s["n"] == 0:
            out[name] = {"tokens": 0}
            continue
        ce = s["ce"] / s["n"]
        out[name] = {"tokens": s["n"], "cross_entropy": ce, "perplexity": math.exp(ce)}
        out[name].update({f"top{k}": s[k] / s["n"] for k in (1, 3, 10)})
    return out


def test_every_number_matches_a_float64_recomputation(corpus: dict[str, Path], tmp_path: Path) -> None:
    model = MambaLMHeadModel(preset("debug", vocab_size=VOCAB)).eval()  # 300 -> 304 padded rows
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer_dir=corpus["tokenizer"])
    out = tmp_path / "metrics.json"
    argv = [str(hf_dir), "--data", str(corpus["stream"]), "--batch-size", "3", "--json", str(out)]
    evaluate.main([*argv, "--buckets", ",".join(map(str, BUCKETS)), "--no-progress"])
    result = json.loads(out.read_text())

    # Every validation sample is scored, the last partial batch included (3 does not divide it).
    total = val_samples(corpus["stream"])
    assert total % 3 != 0
    assert result["samples"] == total and result["batches"] == math.ceil(total / 3)

    dataset = single_stream_dataset(
        tmp_path, corpus["stream"], corpus["tokenizer"], split="val", batch_size=3
    )
    samples = list(dataset)
    del dataset
    batches = [
        {k: torch.stack([s[k] for s in samples[i : i + 3]]) for k in samples[0]}
        for i in range(0, len(samples), 3)
    ]
    expected = reference_metrics(model, batches)
    assert list(result["metrics"]) == list(expected)
    assert result["buckets"] == ["0-3", "4-15", "16-999", "1000+"]
    for group, ref in expected.items():
        got = result["metrics"][group]
        assert got["tokens"] == ref["tokens"], group
        if ref["tokens"] == 0:
            assert got["cross_entropy"] is None and got["top3"] is None, group
            continue
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (group, key)
    # The buckets partition the tokens, and the test covers non-trivial accuracies.
    assert sum(expected[b]["tokens"] for b in result["buckets"]) == expected["all"]["tokens"]
    assert 0 < expected["all"]["top10"] < 1


def test_max_batches_scores_that_many(corpus: dict[str, Path], tmp_path: Path) -> None:
    model = MambaLMHeadModel(preset("debug", vocab_size=VOCAB))
    export_mamba_ssm(model, tmp_path / "ms")  # a mamba_ssm folder: no tokenizer inside
    out = tmp_path / "m.json"
    evaluate.main([
        str(tmp_path / "ms"), "--data", str(corpus["stream"]), "--tokenizer", str(corpus["tokenizer"]),
        "--batch-size", "4", "--max-batches", "2", "--json", str(out), "--no-progress",
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["samples"], result["batches"]) == (8, 2)
    assert result["metrics"]["all"]["tokens"] <= 8 * 32


def test_run_folder_and_checkpoint_sources(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    mixture = write_mixture(
        tmp_path / "mix.yaml", {"stable": {"docs": {"local": str(corpus["stream"]), "proportion": 1}}}
    )
    settings = {
        "run_root": tmp_path / "runs", "run_name": "r", "tokenizer": corpus["tokenizer"], "data.mixture": mixture,
        "model.d_model": 32, "model.n_layer": 2, "model.vocab_size": VOCAB, "model.ssm.d_state": 8,
        "global_train_batch_size": 4, "device_train_microbatch_size": 4, "max_duration": "4ba", "scheduler.t_warmup": "1ba", "scheduler.t_decay": 0.5,
        "eval_interval": None, "checkpoint.save_interval": "2ba", "logging.progress_bar": False,
    }  # fmt: skip
    cfg = load_train_config(
        [ROOT / "yamls/tiny/wsd.yaml"], [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
    )
    trainer = build_trainer(prepare_run(cfg))
    trainer.fit()
    trained = {k: v.detach().clone() for k, v in trainer.state.model.model.state_dict().items()}
    trainer.close()
    del trainer
    clean_stale_shared_memory()

    run = cfg.run_dir
    loaded = load_source(run)
    assert loaded.tokens_trained == 4 * 4 * 32 and loaded.run_dir == run
    for key, value in trained.items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    first = run / "checkpoints" / "ep0-ba2-rank0.pt"
    assert load_source(first).tokens_trained == 2 * 4 * 32
    assert load_source(run, first).checkpoint == str(first)

    capsys.readouterr()
    evaluate.main([str(run), "--no-progress"])  # the run's own data; default output RUN/evaluation.json
    result = json.loads((run / "evaluation.json").read_text())
    assert result["samples"] == val_samples(corpus["stream"]) and result["tokens_trained"] == 4 * 4 * 32
    # One line by default, its numbers those of evaluation.json; the table by position with --verbose.
    m = result["metrics"]["all"]
    assert capsys.readouterr().out.splitlines() == [
        f"eval {run} @{4 * 4 * 32:,} tokens: loss {m['cross_entropy']:.4f}, ppl {m['perplexity']:.2f}, "
        f"top1 {m['top1']:.4f}, top3 {m['top3']:.4f}, top10 {m['top10']:.4f} ({result['samples']} val samples; "
        f"by position: {run / 'evaluation.json'})"
    ]
    evaluate.main([str(run), "--no-progress", "--verbose"])
    table = capsys.readouterr().out
    assert "positions" in table and "0-15" in table and "1024+" in table


@pytest.mark.parametrize(
    ("make_source", "message", "code"),
    [
        (lambda p: p / "missing", "does not exist", 2),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a checkpoint", 2),
        (  # a corrupt checkpoint is a fault (exit 3), as for every reader (handover/reader.py)
            lambda p: (p / "shard").mkdir() or (p / "shard" / ".metadata").touch() or p / "shard",
            ".metadata cannot be read",
            3,
        ),
        (lambda p: "s3://no-such-bucket-here/ckpt.pt", "cannot read s3://no-such-bucket-here/ckpt.pt", 2),
    ],
)
def test_bad_sources_fail_with_one_line(
    make_source, message: str, code: int, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common import cli

    # An object store that refuses the connection at once (nothing listens on port 9 here).
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(evaluate.main, [str(make_source(tmp_path)), "--data", str(tmp_path)])
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: " if code == 2 else "stopped: ") and message in err


def test_position_metrics_buckets_empty_and_partition() -> None:
    metrics = PositionMetrics(vocab_size=12, buckets=(0, 2))
    logits = torch.randn(1, 4, 16)
    metrics.update(logits, torch.tensor([[1, 2, -100, 3]]), torch.tensor([[0, 1, 2, 0]]))
    result = metrics.compute()
    assert [result[g]["tokens"] for g in ("all", "0-1", "2+")] == [3, 3, 0]
    assert result["2+"]["top1"] is None
    with pytest.raises(ValueError, match="must start at 0"):
        PositionMetrics(12, buckets=(1, 4))
