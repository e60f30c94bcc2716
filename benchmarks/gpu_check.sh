#!/usr/bin/env bash
# The GPU check, on a bare single-GPU machine with a preinstalled recent PyTorch (e.g. Python
# 3.12, torch 2.11 for CUDA 13, Triton 3.6, nvcc) and no internet, in under 10 minutes:
#
#   1. record the machine (nvidia-smi, torch, nvcc, the GPU's compute capability);
#   2. install the pure-Python packages it lacks from gpu-wheels/ (made beforehand by
#      `make gpu-wheels` on a machine with the package registries): nothing is downloaded;
#   3. build causal-conv1d and mamba-ssm from their source archives in gpu-wheels/ for the
#      detected architecture only (their setup.py lists several; the others are dropped);
#   4. run the gpu-marked tests (`make test-gpu` with this machine's python);
#   5. run the MFU sweep (benchmarks/gpu_mfu.py: presets 0.5b and 1.6b at sequence 4096);
#   6. run the recipe: the real trainer (Composer) on the demo data for 30 batches with the
#      kernels, bf16 and FSDP on the one GPU, SIGKILLed after batch 15 and resumed by the same
#      command, then evaluated and exported. Where Composer cannot run on this image's torch, the
#      step says exactly why (summary: NOT RUN) instead of failing silently.
#
# Every step has its own time budget and log; a failed step is recorded and the check goes on
# to the steps that do not depend on it. Results: RESULTS_DIR (default results/gpu-check-DATE)
# holds summary.txt, one log per step, mfu.txt and mfu.json.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# Composer 0.32.1 pins torch < 2.7.1, so it is NOT installed here: steps 1-5 need only models/
# (torch), the tests' pytest, and the kernels; step 6 runs only where the pinned stack is
# installed (make install; torch 2.7.0) and otherwise records why not.
# Kernel versions follow the torch found: on the pinned torch 2.7.x, requirements-gpu.txt's
# (what `make install-gpu` installs and the recipe runs with); on a newer torch,
# requirements-gpu-newer-torch.txt's. They cannot be the same on both: mamba-ssm >= 2.3.2 needs
# Triton >= 3.5, which torch 2.7's Triton 3.3 pin excludes (pip would replace torch, STACK.md),
# while an image with a newer torch ships the Triton >= 3.5 these later releases target.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu-wheels}
OUT=${1:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}
SITE=${GPU_SITE:-/tmp/mamba-recipes-gpu-site}   # pure-Python packages that were missing
mkdir -p "$OUT" "$SITE"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$(date +%s)
NOT_RUN=3  # a step's exit status for "cannot run on this machine" (its log says why)
: >"$OUT/summary.txt"

# step NAME BUDGET_S COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line.
step() {
    local name=$1 budget=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (budget ${budget}s)"
    # A step may be a shell function: the exported functions and variables reach the child bash.
    timeout --kill-after=10 "$budget" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local verdict=ok
    [ $rc -eq 124 ] && verdict="TIMED OUT after ${budget}s"
    [ $rc -eq "$NOT_RUN" ] && verdict="NOT RUN (why: see log)"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne "$NOT_RUN" ] && verdict="FAILED (exit $rc)"
    printf '%-16s %-28s %4ss  log: %s\n' "$name" "$verdict" "$(($(date +%s) - t0))" "$name.log" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
    return $rc
}

# 1. The machine.
machine() {
    nvidia-smi || true
    command -v nvcc && nvcc --version
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
}
export PY WHEELS SITE OUT NOT_RUN
export -f machine
step machine 180 machine || { echo "no usable GPU/torch: stopping"; exit 1; }
ARCH=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability(0))')
export TORCH_CUDA_ARCH_LIST="${ARCH:0:-1}.${ARCH: -1}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export ARCH
echo "building for sm_$ARCH (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"

# 2. Pure-Python packages the image may lack, only those missing (the image's own win).
pure_python() {
    test -d "$WHEELS" || { echo "$WHEELS/ not found: run 'make gpu-wheels' on a machine with the registries"; return 1; }
    local missing=()
    "$PY" -c "import einops" 2>/dev/null || missing+=(einops)
    "$PY" -c "import pytest" 2>/dev/null || missing+=(pytest)
    # What mamba_ssm (requirements-gpu-newer-torch.txt) imports from transformers; where the image's transformers
    # lacks it, the 4.x set from gpu-wheels/ goes first on PYTHONPATH.
    "$PY" -c "from transformers.generation import GenerateDecoderOnlyOutput, TextStreamer
from transformers.utils import WEIGHTS_NAME, CONFIG_NAME
from transformers.utils.hub import cached_file" 2>/dev/null || missing+=(transformers tokenizers huggingface-hub)
    echo "missing: ${missing[*]:-nothing}"
    [ ${#missing[@]} -eq 0 ] && return 0
    "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --target "$SITE" --upgrade "${missing[@]}"
}
export -f pure_python
step pure-python 120 pure_python

# 3. The kernels, from source, for this architecture only.
build_one() {  # build_one DIST VERSION FORCE_VAR
    local dist=$1 version=$2 force=$3 src
    src=$(mktemp -d)
    tar -xzf "$WHEELS/${dist//-/_}-$version.tar.gz" -C "$src" 2>/dev/null \
        || tar -xzf "$WHEELS/$dist-$version.tar.gz" -C "$src" \
        || { echo "no source archive for $dist $version in $WHEELS/"; return 1; }
    local dir
    dir=$(find "$src" -maxdepth 1 -mindepth 1 -type d | head -n 1)
    "$PY" benchmarks/gpu_arch_only.py "$dir/setup.py" "$ARCH"
    env "$force=TRUE" "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation --no-deps -v "$dir"
}
export -f build_one
if "$PY" -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.7."))'; then
    KERNELS=requirements-gpu.txt   # the recipe's stack
else
    KERNELS=requirements-gpu-newer-torch.txt   # a newer torch (Triton >= 3.5): see the header
fi
pinned() { sed -n "s/^$1==//p" "$KERNELS"; }
CONV_VERSION=$(pinned causal-conv1d) MAMBA_VERSION=$(pinned mamba-ssm)
echo "kernels: causal-conv1d $CONV_VERSION, mamba-ssm $MAMBA_VERSION" | tee -a "$OUT/summary.txt"
step causal-conv1d 240 build_one causal-conv1d "$CONV_VERSION" CAUSAL_CONV1D_FORCE_BUILD
step mamba-ssm 420 build_one mamba-ssm "$MAMBA_VERSION" MAMBA_FORCE_BUILD

# 4. The gpu-marked tests (make test-gpu, with this machine's python and no .venv). Only their
# file is collected: the others import Composer and Streaming, which are not installed here.
step test-gpu 180 make test-gpu NO_VENV=1 PY="$PY" GPU_TESTS=tests/test_gpu_kernels.py

# 5. The MFU sweep; a shorter sweep than the script's default so the whole check fits.
step mfu 300 "$PY" benchmarks/gpu_mfu.py --out "$OUT" --micro-batches 1 2 4 8 --checkpointing none block \
    --warmup 1 --steps 3

# 6. The recipe on this GPU: benchmarks/gpu_recipe.sh (its header says what it runs and checks).
step recipe 420 bash benchmarks/gpu_recipe.sh "$OUT/recipe"

echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
test -f "$OUT/mfu.txt" && cat "$OUT/mfu.txt"
echo "results in $OUT"
