"""The benchmark scripts that the suite can run: the GPU MFU sweep's CPU dry run and its helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from models.config import preset
from models.flops import forward_flops_per_token
from models.mamba_lm import MambaLMHeadModel

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_mfu_dry_run_writes_consistent_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a clock that advances 0.5 s per reading, every timed step takes 0.5 s: tokens per second,
    TFLOP/s and MFU follow by hand from the batch shape and the model's FLOPs."""
    gpu_mfu = load("gpu_mfu")
    readings = iter(range(10_000))
    monkeypatch.setattr(gpu_mfu.time, "perf_counter", lambda: 0.5 * next(readings))
    rows = gpu_mfu.main(
        ["--dry-run", "--out", str(tmp_path), "--checkpointing", "none", "block", "--peak-tflops", "0.002"]
    )
    assert [(r.micro_batch, r.checkpointing) for r in rows] == [
        (1, "none"),
        (2, "none"),
        (1, "block"),
        (2, "block"),
    ]
    flops_per_token = 3 * forward_flops_per_token(preset("debug"), 64)  # models/flops.py, tested on its own
    for r in rows:
        assert r.status == "ok" and r.seq_len == 64 and r.step_s == 0.5
        assert r.tok_s == r.micro_batch * 64 / 0.5
        assert r.tflops == pytest.approx(flops_per_token * r.micro_batch * 128 / 1e12)
        assert r.mfu == pytest.approx(r.tflops / 0.002)
    saved = json.loads((tmp_path / "mfu.json").read_text())
    assert saved["device"] == "CPU (dry run)" and saved["peak_tflops"] == 0.002
    assert [row["tok_s"] for row in saved["rows"]] == [128.0, 256.0, 128.0, 256.0]
    text = (tmp_path / "mfu.txt").read_text()
    assert "DRY RUN" in text
    best = max(rows, key=lambda r: r.mfu)
    assert f"# best MFU {best.mfu:.3f}: debug mb 2 ckpt none" in text
    assert text.count("     256 ") == 2 and text.count("     128 ") == 2  # the tok/s column


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


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312.0),  # NVIDIA's A100 datasheet: 312 dense bf16 TFLOP/s
        ("NVIDIA H100 80GB HBM3", 989.0),  # H100 SXM datasheet: 989 dense (1979 with sparsity)
        ("NVIDIA H200", 989.0),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores: unknown, the user passes --peak-tflops
    ],
)
def test_gpu_peak_by_device_name(name: str, peak: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_mfu = load("gpu_mfu")
    assert gpu_mfu.detect_peak(torch.device("cpu"), None) == ("CPU (dry run)", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_mfu.detect_peak(torch.device("cuda"), None) == (name, peak)
    assert gpu_mfu.detect_peak(torch.device("cuda"), 100.0) == (name, 100.0)  # --peak-tflops wins


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


def test_gpu_check_stops_after_recording_a_machine_without_gpu(tmp_path: Path) -> None:
    """On a machine without a GPU the check records the failed first step and stops there, exit 1."""
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    out = tmp_path / "results"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_SITE": str(tmp_path / "site"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    done = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no usable GPU/torch: stopping" in done.stdout
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 1 and summary[0].split()[:3] == ["machine", "FAILED", "(exit"]
    log = (out / "machine.log").read_text()  # the machine is recorded before the check gives up
    assert f"python {platform.python_version()} torch {torch.__version__}" in log and "RuntimeError" in log


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
