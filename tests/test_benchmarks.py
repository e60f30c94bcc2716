"""The benchmark scripts that the suite can run: the GPU MFU sweep's CPU dry run and its helpers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from models.config import preset
from models.flops import training_flops_per_token
from models.mamba_lm import MambaLMHeadModel

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_mfu_dry_run_writes_consistent_results(tmp_path: Path) -> None:
    gpu_mfu = load("gpu_mfu")
    rows = gpu_mfu.main(["--dry-run", "--out", str(tmp_path), "--checkpointing", "none", "block"])
    assert [(r.micro_batch, r.checkpointing) for r in rows] == [
        (1, "none"),
        (2, "none"),
        (1, "block"),
        (2, "block"),
    ]
    cfg = preset("debug")
    for r in rows:
        assert r.status == "ok" and r.seq_len == 64 and r.tok_s > 0
        assert r.tflops == pytest.approx(training_flops_per_token(cfg, 64) * r.tok_s / 1e12)
    saved = json.loads((tmp_path / "mfu.json").read_text())
    assert saved["device"] == "CPU (dry run)"
    assert [row["tok_s"] for row in saved["rows"]] == [r.tok_s for r in rows]
    assert "DRY RUN" in (tmp_path / "mfu.txt").read_text()


@pytest.mark.parametrize("mode", ["block", "half"])
def test_checkpointing_modes_keep_gradients(mode: str) -> None:
    gpu_mfu = load("gpu_mfu")
    cfg = preset("debug", n_layer=3, impl="torch")
    ids = torch.randint(0, cfg.vocab_size, (2, 17))

    def grads(checkpointing: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = MambaLMHeadModel(cfg)
        gpu_mfu.set_checkpointing(model, checkpointing)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads("none"), grads(mode)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gpu_peak_by_device_name() -> None:
    gpu_mfu = load("gpu_mfu")
    assert gpu_mfu.detect_peak(torch.device("cpu"), None) == ("CPU (dry run)", None)
    assert gpu_mfu.PEAK_BF16_TFLOPS["A100"] == 312.0


def test_arch_only_keeps_one_target_and_parses() -> None:
    arch_only = load("gpu_arch_only")
    setup = (
        "cc_flag = []\n"
        "if True:\n"
        '    cc_flag.append("-gencode")\n'
        '    cc_flag.append("arch=compute_80,code=sm_80")\n'
        "if v >= 11.8:\n"
        '    cc_flag.append("-gencode")\n'
        '    cc_flag.append("arch=compute_90,code=sm_90")\n'
        "if v >= 12.8:\n"
        '    cc_flag.append("-gencode")\n'
        '    cc_flag.append("arch=compute_100,code=sm_100")\n'
    )
    text, kept, dropped = arch_only.keep_arch(setup, "90")
    assert (kept, dropped) == (1, 2)
    assert arch_only.ARCH_RE.findall(text) == [("90", "90")]
    namespace = {"v": 13.0}
    exec(compile(text, "setup.py", "exec"), namespace)
    assert namespace["cc_flag"] == ["-gencode", "arch=compute_90,code=sm_90"]


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_block_bench_gemms_are_the_mixers_linear_layers() -> None:
    """The GEMM ceiling times exactly the matrix products of the mixer it is compared with."""
    bench_block = load("bench_block")
    for block in ("mamba1", "mamba2"):
        cfg = bench_block.block_config(block, 256)
        mixer = (
            MambaLMHeadModel(preset("debug", **{k: getattr(cfg, k) for k in ("d_model", "ssm")}))
            .backbone.layers[0]
            .mixer
        )
        names = ("in_proj", "x_proj", "dt_proj", "out_proj") if block == "mamba1" else ("in_proj", "out_proj")
        linears = [getattr(mixer, n) for n in names]
        assert bench_block.gemm_shapes(cfg) == [(m.in_features, m.out_features) for m in linears]
