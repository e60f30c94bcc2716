"""eval/harness.py: lm-eval offline on an HF export, its accuracy recomputed from our own model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from eval import harness
from handover.mamba_ssm import export_mamba_ssm
from models.config import AttnConfig, preset
from models.mamba_lm import MambaLMHeadModel
from tests.data_helpers import make_tokenizer

TASK_ITEMS = Path(harness.TASKS_DIR) / "tiny_mc.jsonl"


def reference_accuracy(model: MambaLMHeadModel, tokenizer: Path) -> tuple[float, float]:
    """acc and acc_norm of the local task, as lm-eval defines them, from our model's log-likelihoods."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    items = [json.loads(line) for line in TASK_ITEMS.read_text().splitlines()]
    acc = acc_norm = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = []
        for choice in item["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            start = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole))))
        acc += max(range(4), key=lambda i: scores[i]) == item["answer"]
        acc_norm += max(range(4), key=lambda i: scores[i] / len(item["choices"][i])) == item["answer"]
    return acc / len(items), acc_norm / len(items)


@pytest.mark.slow
def test_lm_eval_on_an_export_matches_our_loglikelihoods(tmp_path: Path, monkeypatch) -> None:
    # The harness must turn offline mode on itself; monkeypatch restores both after the test.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    tokenizer = make_tokenizer(tmp_path / "tok", vocab_size=400)
    model = MambaLMHeadModel(preset("debug", vocab_size=400)).eval()
    export_mamba_ssm(model, tmp_path / "ms")  # exported to HF by the harness, with the tokenizer
    out = tmp_path / "results.json"
    harness.main([str(tmp_path / "ms"), "--tokenizer", str(tokenizer), "--out", str(out), "--device", "cpu"])
    results = json.loads(out.read_text())["results"][harness.LOCAL_TASK]
    acc, acc_norm = reference_accuracy(model, tokenizer)
    assert results["acc,none"] == pytest.approx(acc)
    assert results["acc_norm,none"] == pytest.approx(acc_norm)
    assert math.isfinite(results["acc_stderr,none"])
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow  # about a minute on 2 cores: make test-e2e
def test_unknown_task_and_hybrid_are_refused(tmp_path: Path, monkeypatch) -> None:
    from common.cli import UserError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(UserError, match="unknown lm-eval task"):
        harness.run_lm_eval(tmp_path, ["no_such_task_here"])
    tokenizer = make_tokenizer(tmp_path / "tok", vocab_size=400)
    # A hybrid whose attention has no rotary positions: HF's Bamba (the hybrid class lm-eval loads)
    # always rotates, so it cannot hold it.
    no_rotary = preset("debug-hybrid", vocab_size=400, attn=AttnConfig(num_heads=4))
    export_mamba_ssm(MambaLMHeadModel(no_rotary), tmp_path / "hybrid")
    with pytest.raises(ValueError, match=r"Bamba cannot hold model\.attn\.rotary_emb_dim=0"):
        harness.hf_folder(str(tmp_path / "hybrid"), None, str(tokenizer), tmp_path / "work")
