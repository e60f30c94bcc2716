#!/usr/bin/env bash
# The recipe on one GPU (step 6 of benchmarks/gpu_check.sh): the real trainer (Composer) on the
# demo data, 30 batches of the demo's stable-phase recipe with the kernels (model.impl=kernels),
# bf16 (precision=amp_bf16, FSDP mixed precision DEFAULT) and FSDP on one process
# (fsdp.single_process=true), checkpoints every 10 batches. It is SIGKILLed once batch 15 is
# logged; the same command then resumes from batch 10 and trains to 30 (checked in the metrics);
# then the run is evaluated (recipes.evaluate) and exported to HF (recipes.export).
#
#   bash benchmarks/gpu_recipe.sh OUT_DIR          # run (PYTHON: the interpreter, default python3)
#   bash benchmarks/gpu_recipe.sh --print-config   # the training command's resolved config, and exit
#
# Composer 0.32.1 pins torch>=2.6,<2.7.1. Where this python lacks the pinned Composer/Streaming or
# has another torch, the script prints exactly why and exits 3 (gpu_check.sh: NOT RUN).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's packages, whatever is installed

PY=${PYTHON:-python3}
NOT_RUN=3
DEMO=runs/demo
PRINT_CONFIG=$([ "${1:-}" = --print-config ] && echo 1 || true)
OUT=$([ -n "$PRINT_CONFIG" ] && echo results/gpu-recipe || echo "${1:-results/gpu-recipe}")
RUN="$OUT/stable"
TRAIN=(recipes/train.py yamls/tiny/demo.yaml run_root="$OUT" run_name=stable max_duration=30ba
    model.impl=kernels precision=amp_bf16 fsdp.single_process=true checkpoint.save_interval=10ba
    eval_interval=15ba eval_subset_num_batches=2 logging.console_interval=5ba)

if [ -n "$PRINT_CONFIG" ]; then
    exec "$PY" "${TRAIN[@]}" --print-config
fi

# Why Composer cannot train with this python (nothing when it can).
why=$("$PY" - <<'EOF'
import importlib.metadata as md

try:
    import torch
except ImportError as exc:
    raise SystemExit(print(f"torch does not import: {exc}"))

pins = {"mosaicml": "0.32.1", "mosaicml-streaming": "0.13.0"}  # requirements.txt
for dist, want in pins.items():
    try:
        have = md.version(dist)
    except md.PackageNotFoundError:
        print(f"{dist} is not installed (the recipe pins {dist}=={want})")
        continue
    if have != want:
        print(f"{dist} {have} is installed; the recipe pins {want}")
release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:3])
if not (2, 6, 0) <= release < (2, 7, 1):
    print(
        f"torch {torch.__version__} is installed, but Composer 0.32.1 requires torch>=2.6,<2.7.1: "
        "installing it would replace this torch (the recipe's stack: requirements.txt, torch 2.7.0)"
    )
EOF
)
if [ -n "$why" ]; then
    echo "NOT RUN: the recipe cannot train with $PY:"
    echo "$why"
    echo "pip's view (offline, the wheels in ${GPU_WHEELS:-gpu-wheels}/ only):"
    "$PY" -m pip install --dry-run --no-index --find-links "${GPU_WHEELS:-gpu-wheels}" mosaicml==0.32.1 2>&1 | tail -n 3
    echo "to run it: make install (torch 2.7.0) and make install-gpu, then PYTHON=.venv/bin/python $0 $OUT"
    exit $NOT_RUN
fi

set -e
if ! test -e "$DEMO/mds/chat/stats.json"; then  # the demo data, as make demo-data builds it
    "$PY" -m data.demo_corpus --out "$DEMO/src" --overwrite
    "$PY" -m data.train_tokenizer --out "$DEMO/tokenizer" --vocab-size 4096 --overwrite \
        --source path="$DEMO/src/prose.jsonl",weight=0.6 --source path="$DEMO/src/code.jsonl",weight=0.4
    for name in prose code chat; do
        format=$([ $name = chat ] && echo ,format=chat || true)
        "$PY" -m data.convert --tokenizer "$DEMO/tokenizer" --out "$DEMO/mds/$name" --seq-len 256 \
            --val-fraction 0.03 --overwrite --source "path=$DEMO/src/$name.jsonl$format"
    done
fi
rm -rf "$RUN"

"$PY" "${TRAIN[@]}" &
pid=$!
until grep -q '"time/batch": 15,' "$RUN/metrics.jsonl" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "the first run ended before batch 15"; exit 1; }
    sleep 1
done
kill -9 $pid
wait $pid || true
echo "== SIGKILLed after batch 15; the same command again"
"$PY" "${TRAIN[@]}"
"$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json
import sys

steps = [r["step"] for r in map(json.loads, open(sys.argv[1])) if "loss/train/total" in r]
assert max(steps) == 29, f"the resumed run ended at step {max(steps)}, not 29"
assert 10 in steps and steps.count(10) == steps.count(9) + 1, "the resume did not start from batch 10"
print(f"resumed from the checkpoint at batch 10 and trained to 30 ({len(steps)} logged steps)")
EOF
"$PY" -m recipes.evaluate "$RUN" --no-progress --max-batches 8
"$PY" -m recipes.export "$RUN" --to hf --out "$OUT/export-hf" --overwrite
echo "recipe ok: $RUN, $OUT/export-hf"
