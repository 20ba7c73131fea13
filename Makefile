# deeploc: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_REQUIREMENTS ?= requirements/torch.txt
PYTEST_ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_SILENT := true

.DEFAULT_GOAL := help

.PHONY: help install demo test test-all lint format report bench gpu-check clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml $(TORCH_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r $(TORCH_REQUIREMENTS)
	# sam2 ships as an sdist: build it against the torch above, without its optional CUDA extension.
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## Create .venv with torch, sam2 and deeploc (editable) + dev tools

demo: install ## Generate data, train a decoder on random-weight SAM2 features, test it, write overlays
	$(BIN)/deeploc-train experiment=demo

test: install ## Run the test suite (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: PYTEST_ARGS += -m "slow or not slow"
test-all: test ## Run every test, slow ones included

lint: install ## ruff check + format check
	$(BIN)/ruff check deeploc tests benchmarks hydra_plugins
	$(BIN)/ruff format --check deeploc tests benchmarks hydra_plugins

format: install ## Format and autofix with ruff
	$(BIN)/ruff format deeploc tests benchmarks hydra_plugins
	$(BIN)/ruff check --fix deeploc tests benchmarks hydra_plugins

report: install ## Tables and figures for a sweep: make report SWEEP=outputs/sweeps/paper_table
	$(BIN)/deeploc-report $(SWEEP)

bench: install ## Speed benchmark of the paper table as users run it (CPU; prints tables; ~20 minutes)
	$(BIN)/python benchmarks/bench_speed.py

gpu-check: install ## GPU check of the multi-head path + projection of the full Dolos table (< 8 min on one H200)
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

clean: ## Remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
