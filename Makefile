# Every target runs inside .venv, which `make install` creates on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SCAN_STAMP := models/_build/.built

.PHONY: install install-gpu test test-e2e mutants test-gpu test-triton test-dist test-faults lint format doctor bench-model bench-block bench-data \
	bench-threads bench-convert gpu-wheels gpu-check demo demo-data clean-demo ablation-wsd ablation-cosine \
	ablation-wsd-posweight ablation-tiny hybrid-tiny posweight-tiny decay inheritune-tiny export report needle-tiny lm-eval

install: $(STAMP) $(SCAN_STAMP)

# The pinned stack goes in with uv (installed into .venv by pip): it downloads and unpacks the wheels
# in parallel, and the ~6 GB of PyPI's CUDA torch made pip's install take 270 s of CI's time against
# uv's ~2 minutes. --compile-bytecode writes every .pyc now, as pip does: where PYTHONDONTWRITEBYTECODE
# is set (CI, many containers) each process would otherwise compile Composer's imports again, 2-3x
# slower starts. A private index: UV_INDEX_URL (uv does not read pip.conf); INSTALLER=pip uses pip.
UV := uv==0.13.9
INSTALLER ?= uv
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(INSTALLER),uv)
	$(PY) -m pip install --quiet $(UV)
	$(VENV)/bin/uv pip install --python $(PY) --compile-bytecode -r requirements.txt -r requirements-dev.txt
else
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
endif
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

# pytest with its exit status kept, except that "no test collected" (exit 5) is named: a target that
# selects nothing has lost its tests, which must fail CI, not pass it silently.
pytest = $(PY) -m pytest $(1) || { rc=$$?; if [ $$rc -eq 5 ]; then echo "make $@: pytest collected no test: the target lost its tests" >&2; fi; exit $$rc; }

# The default suite (README "Set up"): CPU only, without the end-to-end tests (marker slow), on
# TEST_WORKERS pytest-xdist workers of one torch thread each (tests/conftest.py); then, alone, the
# few tests (marker serial) that a parallel worker would disturb.
TEST_WORKERS ?= 2
test: install
	$(call pytest,-n $(TEST_WORKERS) --dist loadfile -m "not gpu and not slow and not serial")
	$(call pytest,-p no:xdist -m "serial and not gpu and not slow")

# The end-to-end tests (S3, W&B, FSDP2 resume, decay from a pre-decay checkpoint, ...): CI runs them too.
test-e2e: install
	$(call pytest,-n $(TEST_WORKERS) --dist loadfile -m "slow and not gpu")

# Mutation testing of the training-critical modules (tests/mutants.py): not in CI, it takes a while.
mutants: install
	$(PY) -m pip install --quiet -r requirements-mutants.txt
	nice $(PY) -m tests.mutants $(MODULES)

# NO_VENV=1 PY=python3: a GPU machine's own PyTorch instead of .venv (benchmarks/gpu_check.sh);
# GPU_TESTS: only these test files (default: all).
test-gpu: $(if $(NO_VENV),,install)
	$(call pytest,-m gpu $(GPU_TESTS))

# Mamba-2's kernel path on the CPU: mamba_ssm's Triton SSD kernels in Triton's interpreter against
# the PyTorch path (tests/test_triton_interpret.py). TRITON_VENV holds only mamba-ssm and
# causal-conv1d, built without their CUDA extensions (--no-deps: nothing else is installed or
# touched), and sees every package of .venv through a .pth file; .venv itself never sees mamba_ssm.
# mamba_ssm's one pure-Python dependency, for the Triton venv and the GPU machine's wheels alike.
EINOPS := einops==0.8.2
TRITON_VENV := .venv-triton
TRITON_PY := $(TRITON_VENV)/bin/python
TRITON_STAMP := $(TRITON_VENV)/.installed

$(TRITON_STAMP): $(STAMP) requirements-gpu.txt
	rm -rf $(TRITON_VENV)
	$(PY) -m venv --without-pip $(TRITON_VENV)
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	layer=$$($(TRITON_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "import site; site.addsitedir('$$base')" > $$layer/_on_main_venv.pth
	$(TRITON_PY) -m pip install --quiet --no-deps wheel==0.48.0 $(EINOPS)
	MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
		$(TRITON_PY) -m pip install --quiet --no-deps --no-build-isolation -r requirements-gpu.txt
	touch $(TRITON_STAMP)

test-triton: $(TRITON_STAMP)
	TRITON_INTERPRET=1 $(TRITON_PY) -m pytest -m triton_interpret -s tests/test_triton_interpret.py

test-dist: install
	$(call pytest,-n $(TEST_WORKERS) --dist loadfile -m dist)

# Kill, corrupt, fill the disk, inject NaNs; the same command must recover (tests/fault_injection.py).
test-faults: install
	$(PY) -m tests.fault_injection

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

# Both kernel pairs: requirements-gpu.txt's (for the pinned torch 2.7.0, the recipe's stack) and
# requirements-gpu-newer-torch.txt's for an image's newer torch; gpu_check.sh builds the pair that
# fits the torch it finds.
GPU_KERNELS := $(shell grep -hE '^(mamba-ssm|causal-conv1d)==' requirements-gpu.txt requirements-gpu-newer-torch.txt)

gpu-wheels: install
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp
	$(PY) -m pip install --quiet wheel  # the kernels' setup.py needs it to report metadata
	MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(PY) -m pip download --quiet --no-deps \
		--no-binary :all: --no-build-isolation -d $(GPU_WHEELS).tmp $(GPU_KERNELS)
	$(PY) -m pip download --quiet --no-deps --only-binary :all: $(GPU_WHEEL_PLATFORMS) -d $(GPU_WHEELS).tmp \
		$(EINOPS) pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 \
		transformers==4.53.3 tokenizers==0.21.4 huggingface-hub==0.34.4
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)
	ls -l $(GPU_WHEELS)

gpu-check:
	bash benchmarks/gpu_check.sh $(RESULTS)

bench-convert: install
	$(PY) benchmarks/bench_convert.py

# ---------------------------------------------------------------------------------------------
# The demo: built-in data (the Python standard library), offline, on CPU. Each step prints a summary
# line (training: the plan, a progress line, one line per evaluation, the checkpoints); VERBOSE=1 echoes
# every command and passes --verbose to it (each step's full output).
DEMO := runs/demo
QUIET := $(if $(VERBOSE),,@)
VERBOSE_FLAG := $(if $(VERBOSE),--verbose,)
DEMO_STREAMS := $(DEMO)/mds/prose/stats.json $(DEMO)/mds/code/stats.json $(DEMO)/mds/chat/stats.json
COMPOSER := $(VENV)/bin/composer
NPROC ?= 8

$(DEMO)/src/chat.jsonl: | $(STAMP)
	$(QUIET)$(PY) -m data.demo_corpus --out $(DEMO)/src --overwrite

$(DEMO)/tokenizer/tokenizer.json: $(DEMO)/src/chat.jsonl
	$(QUIET)$(PY) -m data.train_tokenizer --out $(DEMO)/tokenizer --vocab-size 4096 --overwrite $(VERBOSE_FLAG) \
		--source path=$(DEMO)/src/prose.jsonl,weight=0.6 --source path=$(DEMO)/src/code.jsonl,weight=0.4

$(DEMO)/mds/%/stats.json: $(DEMO)/tokenizer/tokenizer.json
	$(QUIET)$(PY) -m data.convert --tokenizer $(DEMO)/tokenizer --out $(DEMO)/mds/$* --seq-len 256 --val-fraction 0.03 \
		--overwrite $(VERBOSE_FLAG) --source path=$(DEMO)/src/$*.jsonl$(if $(filter chat,$*),$(comma)format=chat,)

comma := ,

demo-data: $(DEMO_STREAMS)

# Stable phase (WSD + positional weighting, pre-decay checkpoint), a custom decay from that
# checkpoint on the decay mix, then evaluation (by position, a sample) and the report's figures.
# Re-running resumes (or skips) finished runs; `make clean-demo` starts over.
demo: install demo-data
	$(QUIET)$(PY) recipes/train.py yamls/tiny/demo.yaml $(VERBOSE_FLAG)
	$(QUIET)$(PY) recipes/train.py yamls/tiny/demo_decay.yaml $(VERBOSE_FLAG) \
		checkpoint.load_path=$$(ls $(DEMO)/stable/checkpoints/pre-decay/pre-decay-*.pt | head -n 1)
	$(QUIET)$(PY) -m recipes.evaluate $(DEMO)/stable $(VERBOSE_FLAG) --prompt "def read_config(path):"
	$(QUIET)$(PY) -m recipes.evaluate $(DEMO)/decay $(VERBOSE_FLAG) --prompt "<|im_start|>user"$$'\n'"What does the with statement do?<|im_end|>"$$'\n'"<|im_start|>assistant"$$'\n'
	$(QUIET)$(PY) -m eval.report $(DEMO)/stable $(DEMO)/decay --out $(DEMO)/report

clean-demo:
	rm -rf $(DEMO)

# ---------------------------------------------------------------------------------------------
# The paper's ablations (0.5B, 10B tokens; GPUs): NPROC processes on this node. For several
# nodes, run the `composer` line of the README on each node, with checkpoint.save_folder on a file
# system every node sees or an object store (README, "Many nodes").
ablation-wsd: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_wsd.yaml

ablation-cosine: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_cosine.yaml

ablation-wsd-posweight: install
	$(COMPOSER) -n $(NPROC) recipes/train.py yamls/ablation_wsd_posweight.yaml

# The three ablations' tiny twins on CPU (demo data), once per seed in SEEDS, each evaluated by
# position on the whole validation split; then the table (mean ± std over seeds, and the paper's
# comparisons as paired differences with a 95% interval and a verdict: runs/ablation-tiny/ablation.md),
# and the report over every seed (the first seed's figures, findings.md). Runs go ABLATION_JOBS at a
# time, one thread each; a finished run (its evaluation.json) is skipped.
SEEDS ?= 0 1 2
ABLATION_JOBS ?= 2
# Extra key=value overrides for every run, e.g. ABLATION_ARGS="max_duration=60ba eval_interval=30ba".
ABLATION_ARGS ?=
ABLATION := runs/ablation-tiny
ABLATION_VARIANTS := wsd cosine wsd-posweight
ABLATION_EVALS := $(foreach s,$(SEEDS),$(foreach v,$(ABLATION_VARIANTS),$(ABLATION)/$(v)-s$(s)/evaluation.json))

# $* is <variant>-s<seed>; the recipe of variant a-b is yamls/tiny/a_b.yaml. The seed sets the
# initialisation and the data order (the same for every variant of one seed: paired runs).
$(ABLATION)/%/evaluation.json: | $(STAMP) $(DEMO_STREAMS)
	stem=$*; variant=$${stem%-s*}; seed=$${stem##*-s}; \
	OMP_NUM_THREADS=$(if $(filter 1,$(ABLATION_JOBS)),2,1) $(PY) recipes/train.py yamls/tiny/$${variant//-/_}.yaml \
		run_root=$(ABLATION) run_name=$$stem seed=$$seed data.shuffle_seed=$$seed logging.progress_bar=false logging.console_interval=50ba $(ABLATION_ARGS); \
	$(PY) -m recipes.evaluate $(ABLATION)/$$stem --no-progress

ablation-tiny: install demo-data
	$(MAKE) -j$(ABLATION_JOBS) $(ABLATION_EVALS)
	$(PY) -m eval.ablation $(ABLATION) --variants $(ABLATION_VARIANTS) --seeds $(SEEDS)
	$(PY) -m eval.report $(foreach s,$(SEEDS),$(foreach v,$(ABLATION_VARIANTS),$(ABLATION)/$(v)-s$(s))) --out $(ABLATION)/report

# The empirical study's hybrid claim at CPU scale (README "Hybrid at CPU scale"): the Mamba-2, the
# Mamba-2-attention hybrid (42% Mamba-2, 8% attention, 50% MLP layers) and the transformer of
# yamls/tiny/study_*.yaml, equal in size (non-embedding parameters within 5%, tests/test_hybrid_study.py)
# and in tokens, once per seed in SEEDS on the demo corpus (same data order per seed: paired), each
# evaluated by position; then the table and the hybrid's comparisons with each pure model, with their 95%
# intervals and verdicts (runs/hybrid-tiny/ablation.md), and the report (report/findings.md). Runs go
# ABLATION_JOBS at a time, one thread each; a finished run (its evaluation.json) is skipped.
HYBRID := runs/hybrid-tiny
HYBRID_VARIANTS := mamba2 hybrid attention
HYBRID_EVALS := $(foreach s,$(SEEDS),$(foreach v,$(HYBRID_VARIANTS),$(HYBRID)/$(v)-s$(s)/evaluation.json))

# $* is <variant>-s<seed>; the recipe of variant v is yamls/tiny/study_v.yaml.
$(HYBRID)/%/evaluation.json: | $(STAMP) $(DEMO_STREAMS)
	stem=$*; variant=$${stem%-s*}; seed=$${stem##*-s}; \
	OMP_NUM_THREADS=$(if $(filter 1,$(ABLATION_JOBS)),2,1) $(PY) recipes/train.py yamls/tiny/study_$$variant.yaml \
		run_name=$$stem seed=$$seed data.shuffle_seed=$$seed logging.progress_bar=false logging.console_interval=50ba \
		$(ABLATION_ARGS) && \
	$(PY) -m recipes.evaluate $(HYBRID)/$$stem --no-progress

hybrid-tiny: install demo-data
	$(MAKE) -j$(ABLATION_JOBS) $(HYBRID_EVALS)
	$(PY) -m eval.ablation $(HYBRID) --variants $(HYBRID_VARIANTS) --seeds $(SEEDS)
	$(PY) -m eval.report $(foreach s,$(SEEDS),$(foreach v,$(HYBRID_VARIANTS),$(HYBRID)/$(v)-s$(s))) --out $(HYBRID)/report

# Positional weighting, designed so the paper's effect (better top-k at later positions, about the
# same perplexity) would show if it exists at this scale: long documents at sequence 2048
# (yamls/data/long_docs.yaml: about 23% of tokens at positions 256-1023 and 64% at 1024+), WSD with
# and without weighting (yamls/tiny/long_wsd*.yaml), POSWEIGHT_SEEDS seeds each on the same data
# order (paired), every final checkpoint evaluated by position bucket; then the comparisons with
# their 95% intervals and verdicts (runs/posweight-tiny/ablation.md, report/findings.md).
POSWEIGHT := runs/posweight-tiny
POSWEIGHT_SEEDS ?= 0 1 2 3 4
POSWEIGHT_ARGS ?=
POSWEIGHT_VARIANTS := wsd wsd-posweight
POSWEIGHT_STREAMS := $(POSWEIGHT)/mds/prose/stats.json $(POSWEIGHT)/mds/code/stats.json
POSWEIGHT_EVALS := $(foreach s,$(POSWEIGHT_SEEDS),$(foreach v,$(POSWEIGHT_VARIANTS),$(POSWEIGHT)/$(v)-s$(s)/evaluation.json))

$(POSWEIGHT)/mds/%/stats.json: $(DEMO)/tokenizer/tokenizer.json
	$(PY) -m data.convert --tokenizer $(DEMO)/tokenizer --out $(POSWEIGHT)/mds/$* --seq-len 2048 --val-fraction 0.1 \
		--overwrite --source path=$(DEMO)/src/$*.jsonl

# $* is <variant>-s<seed>; the recipe of variant a-b is yamls/tiny/long_a_b.yaml.
$(POSWEIGHT)/%/evaluation.json: | $(STAMP) $(POSWEIGHT_STREAMS)
	stem=$*; variant=$${stem%-s*}; seed=$${stem##*-s}; \
	OMP_NUM_THREADS=$(if $(filter 1,$(ABLATION_JOBS)),2,1) $(PY) recipes/train.py yamls/tiny/long_$${variant//-/_}.yaml \
		run_root=$(POSWEIGHT) run_name=$$stem seed=$$seed data.shuffle_seed=$$seed logging.progress_bar=false logging.console_interval=50ba \
		$(POSWEIGHT_ARGS) && \
	$(PY) -m recipes.evaluate $(POSWEIGHT)/$$stem --no-progress

posweight-tiny: install $(POSWEIGHT_STREAMS)
	$(MAKE) -j$(ABLATION_JOBS) $(POSWEIGHT_EVALS)
	$(PY) -m eval.ablation $(POSWEIGHT) --variants $(POSWEIGHT_VARIANTS) --seeds $(POSWEIGHT_SEEDS)
	$(PY) -m eval.report $(foreach s,$(POSWEIGHT_SEEDS),$(foreach v,$(POSWEIGHT_VARIANTS),$(POSWEIGHT)/$(v)-s$(s))) \
		--out $(POSWEIGHT)/report

# Your own decay from a pre-decay checkpoint: make decay CKPT=path/pre-decay/pre-decay-ba....pt RECIPE=yamls/decay/....yaml
decay: install
	@test -n "$(CKPT)" -a -n "$(RECIPE)" || { echo "usage: make decay CKPT=pre-decay-checkpoint RECIPE=yamls/decay/recipe.yaml [NPROC=8]"; exit 2; }
	@test -e "$(CKPT)" || { echo "CKPT=$(CKPT) does not exist"; exit 2; }
	$(COMPOSER) -n $(NPROC) recipes/train.py $(RECIPE) checkpoint.load_path=$(CKPT)

# Inheritune on CPU (demo data): a 4-block reference, then its first 2 blocks grown one block per
# 20-step round until the validation loss matches the reference's, beside the same depth from
# scratch for the same and twice the steps. Table: runs/inheritune/inheritune/inheritune.md.
inheritune-tiny: install demo-data
	test -e runs/inheritune/reference/checkpoints/latest-rank0.pt || $(PY) recipes/train.py yamls/tiny/inheritune_reference.yaml
	$(PY) -m recipes.inheritune yamls/tiny/inheritune.yaml --reference runs/inheritune/reference --baselines

# Hand a run on: make export RUN=runs/demo/decay TO=hf OUT=exports/demo-decay [TOKENIZER=dir]
export: install
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make export RUN=run-or-checkpoint OUT=dir [TO=hf|mamba_ssm] [TOKENIZER=dir]"; exit 2; }
	$(PY) -m recipes.export $(RUN) --to $(or $(TO),hf) --out $(OUT) $(if $(TOKENIZER),--tokenizer $(TOKENIZER),)
# ---------------------------------------------------------------------------------------------
# Evaluation and evidence (README "Evaluate").

# The paper's figures and the findings page (each comparison with its interval and verdict; runs named
# <variant>-s<seed> are seeds of one variant) for any runs: make report RUNS="runs/a runs/b" [REPORT_OUT=runs/report].
# A run whose evaluation.json is missing or older than its latest checkpoint is evaluated first.
REPORT_OUT ?= runs/report
report: install
	@test -n "$(RUNS)" || { echo 'usage: make report RUNS="run-folder ..." [REPORT_OUT=runs/report]'; exit 2; }
	for run in $(RUNS); do \
		if [ -e $$run/checkpoints/latest-rank0.pt ] && ! [ $$run/evaluation.json -nt $$run/checkpoints/latest-rank0.pt ]; then \
			$(PY) -m recipes.evaluate $$run --no-progress || exit $$?; fi; \
	done
	$(PY) -m eval.report $(RUNS) --out $(REPORT_OUT)

# Needle in a haystack at CPU scale (README "Needle in a haystack"): a tiny Mamba, a Mamba-2 and their
# attention-only twin (rotary positions) trained alike at sequence NEEDLE_TRAIN on passkey documents only
# (a 1- to 3-digit pass key written one digit per token in a synthetic filler haystack), then asked for the
# pass key at 1x to 16x the training length, 10 depths, NEEDLE_TRIALS numbers per cell; the table (mean and
# spread over seeds) and the heatmaps side by side go to runs/needle/table.md and heatmaps.png. One seed by
# default; SEEDS="0 1 2" (on the command line) or NEEDLE_SEEDS for more. The runs go one after the other,
# one thread each (NEEDLE_JOBS=2: two at a time); a finished run (its trials.json) is skipped.
NEEDLE := runs/needle
NEEDLE_TRAIN := 128
NEEDLE_LENGTHS ?= 128,256,512,1024,2048
NEEDLE_TRIALS ?= 2
NEEDLE_MODELS ?= mamba mamba2 attention
NEEDLE_SEEDS ?= $(if $(filter command line,$(origin SEEDS)),$(SEEDS),0)
NEEDLE_JOBS ?= 1
NEEDLE_KEY := --max-number 999 --digits spaced
NEEDLE_RUNS := $(foreach s,$(NEEDLE_SEEDS),$(foreach m,$(NEEDLE_MODELS),$(NEEDLE)/$(m)-s$(s)))

$(NEEDLE)/src/passkey.jsonl: | $(STAMP)
	$(PY) -m data.passkey --filler --out $(NEEDLE)/src --count 30000 --min-words 5 --max-words 45 $(NEEDLE_KEY) --overwrite

$(NEEDLE)/mds/passkey/stats.json: $(NEEDLE)/src/passkey.jsonl $(DEMO)/tokenizer/tokenizer.json
	$(PY) -m data.convert --tokenizer $(DEMO)/tokenizer --out $(NEEDLE)/mds/passkey --seq-len $(NEEDLE_TRAIN) \
		--val-fraction 0.01 --overwrite --source path=$(NEEDLE)/src/passkey.jsonl

# $* is <model>-s<seed>: yamls/tiny/needle_<model>.yaml, the seed setting the initialisation and data order.
$(NEEDLE)/%/needle/trials.json: | $(STAMP) $(NEEDLE)/mds/passkey/stats.json
	stem=$*; model=$${stem%-s*}; seed=$${stem##*-s}; \
	OMP_NUM_THREADS=1 $(PY) recipes/train.py yamls/tiny/needle_$$model.yaml run_name=$$stem seed=$$seed \
		data.shuffle_seed=$$seed logging.progress_bar=false logging.console_interval=100ba && \
	OMP_NUM_THREADS=1 $(PY) -m eval.needle $(NEEDLE)/$$stem --haystack $(NEEDLE)/src/filler.txt $(NEEDLE_KEY) \
		--lengths $(NEEDLE_LENGTHS) --trials $(NEEDLE_TRIALS) --train-length $(NEEDLE_TRAIN) --no-progress \
		--title "needle in a haystack: tiny $$model, seed $$seed" --out $(NEEDLE)/$$stem/needle

needle-tiny: install
	$(MAKE) -j$(NEEDLE_JOBS) $(foreach r,$(NEEDLE_RUNS),$(r)/needle/trials.json)
	$(PY) -m eval.needle_table $(foreach r,$(NEEDLE_RUNS),$(r)/needle) --out $(NEEDLE)

# lm-eval on a run folder, checkpoint or HF folder: make lm-eval CKPT=runs/demo/stable [TASKS=...]
# [FEWSHOT=n] [ONLINE=1: let lm-eval download task data; offline, it reads the local HF cache only].
TASKS ?= mamba_recipes_tiny_mc
lm-eval: install
	@test -n "$(CKPT)" || { echo "usage: make lm-eval CKPT=run-folder|checkpoint|hf-folder [TASKS=task,...] [FEWSHOT=n] [ONLINE=1]"; exit 2; }
	$(PY) -m eval.harness $(CKPT) --tasks $(TASKS) $(if $(FEWSHOT),--num-fewshot $(FEWSHOT),) $(if $(ONLINE),--online,) \
		--out $(if $(LM_EVAL_OUT),$(LM_EVAL_OUT),runs/lm-eval/$(notdir $(CKPT)).json)
