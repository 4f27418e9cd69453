# megads: the two commands of the README are `make train` and `make test`.
# Everything else here is a building block of those two.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: on the CPU development machines pip finds the local CPU wheel of this
# version, on a GPU cluster the same pin resolves to the CUDA build from the package index.
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
TRAIN_ARGS ?=

.PHONY: setup train test test-all lint clean scale-check

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	@touch $@

setup: $(VENV)/.installed

## Prepare the built-in data and run the main job on the default config (tiny model, CPU ranks).
train: setup
	$(PY) -m tools.prepare_data
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m megads.train.cli $(TRAIN_ARGS)

## The default test suite (what CI runs).
test: setup
	$(PY) -m pytest -q tests

## Everything, slow checks included.
test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" tests

## ep=64 on 64 CPU ranks, exact against one process (about 4-7 minutes, 14 GiB of memory).
scale-check: setup
	$(PY) -m tools.parallel_scale_check --ep 64

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs runs wandb .pytest_cache
