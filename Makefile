# Every job is one command on a fresh clone: targets that need Python depend on the venv.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export HF_HUB_OFFLINE ?= 1

.DEFAULT_GOAL := help
.PHONY: help install test lint demo summary train-tokenizer train-tokenizer-ddp sweep-merge sweep-codebook
NPROC ?= 2
DEMO_DIR ?= outputs/demo

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## make .venv (pip, torch pinned by constraints.txt)

test: $(STAMP) ## run the test suite
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check mergevq tests

summary: $(STAMP) ## parameter/GFLOP table, e.g. make summary ARGS="tokenizer=d64 variant=gr"
	$(PY) -m mergevq.summary $(ARGS)

demo: $(STAMP) ## train the tiny G+R tokenizer on Fashion-MNIST (CPU, minutes); grid + per-K table in outputs/demo
	MERGEVQ_RUN_DIR=$(DEMO_DIR) $(PY) -m mergevq.train_tokenizer experiment=demo_tiny $(ARGS)
	$(PY) -m mergevq.demo $(DEMO_DIR)

train-tokenizer: $(STAMP) ## stage I, e.g. make train-tokenizer ARGS="experiment=tokenizer_256_gr_d64 data.root=..."
	$(PY) -m mergevq.train_tokenizer $(ARGS)

train-tokenizer-ddp: $(STAMP) ## stage I on NPROC CPU processes (torchrun); GPUs: see README
	ACCELERATE_USE_CPU=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m mergevq.train_tokenizer $(ARGS)

sweep-merge: $(STAMP) ## Hydra multirun over keep-K candidate lists (sweep=merge_ratio)
	$(PY) -m mergevq.train_tokenizer sweep=merge_ratio $(ARGS)

sweep-codebook: $(STAMP) ## Hydra multirun over LFQ bits x entropy weight (sweep=codebook)
	$(PY) -m mergevq.train_tokenizer sweep=codebook $(ARGS)
