"""What of the GPU check's recipe step (benchmarks/gpu_recipe.sh) a CPU can check: the script
parses, its training command resolves to kernels + bf16 + FSDP on one process, a one-process
FSDP config really asks Composer for FSDP, and on a python where Composer cannot run the step
says why and exits 3 (gpu_check.sh's NOT RUN) instead of failing silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes.config import FSDPConfig
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_recipe.sh"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def test_scripts_parse() -> None:
    for name in ("gpu_check.sh", "gpu_recipe.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / name)], check=True)


def test_the_recipe_step_trains_with_kernels_bf16_and_fsdp_on_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The script's own command line, recorded by a stand-in interpreter, then resolved by the training
    # entry point in this process (a fresh Python would import torch and Composer again).
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    recorder.chmod(0o755)
    out = run_script("--print-config", env={"PYTHON": str(recorder)})
    assert out.returncode == 0, out.stdout + out.stderr
    script, *args = (tmp_path / "argv").read_text().splitlines()
    assert script == "recipes/train.py" and args[-1] == "--print-config"
    monkeypatch.chdir(ROOT)  # where the script runs its command
    printed = run_cli(script, *args)
    assert printed.returncode == 0, printed.stderr
    cfg = yaml.safe_load(printed.stdout)
    assert cfg["model"]["impl"] == "kernels"
    assert cfg["precision"] == "amp_bf16"
    assert cfg["max_duration"] == "30ba"
    assert cfg["checkpoint"]["save_interval"] == "10ba"
    fsdp = FSDPConfig(**{k: v for k, v in cfg["fsdp"].items()})
    assert fsdp.parallelism(world_size=1) == {
        "fsdp": {
            "activation_checkpointing": False,
            "state_dict_type": "sharded",
            "mixed_precision": "DEFAULT",
        }
    }


def test_one_process_runs_without_fsdp_unless_asked() -> None:
    assert FSDPConfig().parallelism(world_size=1) is None
    assert FSDPConfig(single_process=True, enabled=False).parallelism(world_size=1) is None
    assert FSDPConfig(single_process=True).parallelism(world_size=1) is not None


def test_a_torch_composer_cannot_use_is_named_with_exit_3(tmp_path: Path) -> None:
    """A GPU image's newer torch (a stand-in module reporting 2.11.0): the step names the pin."""
    (tmp_path / "torch.py").write_text('__version__ = "2.11.0+cu130"\n')
    out = run_script(str(tmp_path / "out"), env={"PYTHONPATH": str(tmp_path), "GPU_WHEELS": str(tmp_path)})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "NOT RUN" in out.stdout
    assert "torch 2.11.0+cu130 is installed, but Composer 0.32.1 requires torch>=2.6,<2.7.1" in out.stdout
    assert not (tmp_path / "out").exists()
