# Every target runs inside .venv, which `make install` creates on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCAN_STAMP := models/_build/.built

.PHONY: install install-gpu test test-gpu test-dist lint format doctor bench-model bench-block bench-data bench-threads \
	bench-convert gpu-wheels gpu-check demo demo-data clean-demo \
	ablation-wsd ablation-cosine ablation-wsd-posweight ablation-tiny decay

install: $(STAMP) $(SCAN_STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The fused CPU selective scan (models/cpu_scan.c, about a second with gcc), built before any
# training step; without a compiler it says why and the PyTorch loop runs.
$(SCAN_STAMP): models/cpu_scan.c models/cpu_scan.py $(STAMP)
	$(PY) -m models.cpu_scan
	mkdir -p $(@D) && touch $@

# The mamba-ssm / causal-conv1d CUDA kernels (GPU machines with nvcc). On a machine with
# internet the packages fetch a prebuilt wheel; offline, set MAMBA_FORCE_BUILD=TRUE
# CAUSAL_CONV1D_FORCE_BUILD=TRUE to compile them.
install-gpu: install
	$(PY) -m pip install --no-build-isolation -r requirements-gpu.txt

# The default suite: CPU only, including the 2-process composer-launcher tests.
test: install
	$(PY) -m pytest -m "not gpu"

# NO_VENV=1 PY=python3: a GPU machine's own PyTorch instead of .venv (benchmarks/gpu_check.sh);
# GPU_TESTS: only these test files (default: all).
test-gpu: $(if $(NO_VENV),,install)
	$(PY) -m pytest -m gpu $(GPU_TESTS)

test-dist: install
	$(PY) -m pytest -m dist

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

doctor: install
	$(PY) -m recipes.doctor

bench-model: install
	$(PY) benchmarks/bench_model.py

# One 130m-width block (Mamba-1, Mamba-2) against HF's mixers and its own GEMM ceiling.
bench-block: install
	$(PY) benchmarks/bench_block.py

# The StreamingDataset loader's tokens/s per rank beside what one GPU consumes.
bench-data: install
	$(PY) benchmarks/bench_data.py

# The demo model's training step by thread count, with and without a competing load.
bench-threads: install
	$(PY) benchmarks/bench_threads.py

# ---------------------------------------------------------------------------------------------
# The GPU check for a bare GPU machine without internet (benchmarks/gpu_check.sh): first, here,
# `make gpu-wheels` (source archives of the kernels, pure-Python wheels for Python 3.12), then
# copy the checkout with gpu-wheels/ there and run `make gpu-check` (no .venv needed).
GPU_WHEELS := gpu-wheels
GPU_WHEEL_PLATFORMS := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: install
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp
	$(PY) -m pip install --quiet wheel  # the kernels' setup.py needs it to report metadata
	MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(PY) -m pip download --quiet --no-deps \
		--no-binary :all: --no-build-isolation -d $(GPU_WHEELS).tmp mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
	$(PY) -m pip download --quiet --no-deps --only-binary :all: $(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS).tmp \
		einops==0.8.1 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 \
		transformers==4.53.3 tokenizers==0.21.4 huggingface-hub==0.34.4
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	ls -l $(GPU_WHEELS)

gpu-check:
	bash benchmarks/gpu_check.sh $(RESULTS)

bench-convert: install
	$(PY) benchmarks/bench_convert.py

# ---------------------------------------------------------------------------------------------
# The demo: built-in data (the Python standard library), offline, on CPU.
DEMO := runs/demo
DEMO_STREAMS := $(DEMO)/mds/prose/stats.json $(DEMO)/mds/code/stats.json $(DEMO)/mds/chat/stats.json
COMPOSER := $(VENV)/bin/composer
NPROC ?= 8

$(DEMO)/src/chat.jsonl: | $(STAMP)
	$(PY) -m data.demo_corpus --out $(DEMO)/src --overwrite

$(DEMO)/tokenizer/tokenizer.json: $(DEMO)/src/chat.jsonl
	$(PY) -m data.train_tokenizer --out $(DEMO)/tokenizer --vocab-size 4096 --overwrite \
		--source path=$(DEMO)/src/prose.jsonl,weight=0.6 --source path=$(DEMO)/src/code.jsonl,weight=0.4

$(DEMO)/mds/%/stats.json: $(DEMO)/tokenizer/tokenizer.json
	$(PY) -m data.convert --tokenizer $(DEMO)/tokenizer --out $(DEMO)/mds/$* --seq-len 256 --val-fraction 0.03 \
		--overwrite --source path=$(DEMO)/src/$*.jsonl$(if $(filter chat,$*),$(comma)format=chat,)

comma := ,

demo-data: $(DEMO_STREAMS)

# Stable phase (WSD + positional weighting, pre-decay checkpoint), a custom decay from that
# checkpoint on the decay mix, then evaluation, a sample and the loss curves. Re-running
# resumes (or skips) finished runs; `make clean-demo` starts over.
demo: install demo-data
	$(PY) recipes/train.py yamls/tiny/demo.yaml
	$(PY) recipes/train.py yamls/tiny/demo_decay.yaml \
		checkpoint.load_path=$$(ls $(DEMO)/stable/checkpoints/pre-decay-*.pt | head -n 1)
	$(PY) -m recipes.evaluate $(DEMO)/stable --prompt "def read_config(path):"
	$(PY) -m recipes.evaluate $(DEMO)/decay --prompt "<|im_start|>user"$$'\n'"What does the with statement do?<|im_end|>"$$'\n'"<|im_start|>assistant"$$'\n'
	$(PY) -m recipes.plot $(DEMO)/stable $(DEMO)/decay --out $(DEMO)/loss.png

clean-demo:
	rm -rf $(DEMO)

# ---------------------------------------------------------------------------------------------
# The paper's ablations (0.5B, 10B tokens; GPUs): NPROC processes on this node. For several
# nodes, run the `composer` line of the README on each node.
ablation-wsd: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_wsd.yaml

ablation-cosine: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_cosine.yaml

ablation-wsd-posweight: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_wsd_posweight.yaml

# The three ablations' tiny twins on CPU (demo data), then their loss curves in one PNG.
ablation-tiny: install demo-data
	$(PY) recipes/train.py yamls/tiny/wsd.yaml run_root=runs/tiny run_name=wsd
	$(PY) recipes/train.py yamls/tiny/cosine.yaml run_root=runs/tiny run_name=cosine
	$(PY) recipes/train.py yamls/tiny/wsd_posweight.yaml run_root=runs/tiny run_name=wsd-posweight
	$(PY) -m recipes.plot runs/tiny/wsd runs/tiny/cosine runs/tiny/wsd-posweight --out runs/tiny/ablation.png

# Your own decay from a pre-decay checkpoint: make decay CKPT=path/pre-decay-ba....pt RECIPE=yamls/decay/....yaml
decay: install
	@test -n "$(CKPT)" -a -n "$(RECIPE)" || { echo "usage: make decay CKPT=pre-decay-checkpoint RECIPE=yamls/decay/recipe.yaml [NPROC=8]"; exit 2; }
	@test -e "$(CKPT)" || { echo "CKPT=$(CKPT) does not exist"; exit 2; }
	$(COMPOSER) -n $(NPROC) recipes/train.py $(RECIPE) checkpoint.load_path=$(CKPT)
