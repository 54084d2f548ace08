# Every job is one command on a fresh clone: targets that need Python depend on the venv.
PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
export HF_HUB_OFFLINE ?= 1

.DEFAULT_GOAL := help
.PHONY: help install test lint demo summary

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

demo: $(STAMP) ## reconstruct photos with the tiny tokenizer (grows into the full pipeline)
	$(PY) -m mergevq.demo $(ARGS)
