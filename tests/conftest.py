from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CONF_DIR = ROOT / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The converted default model is shared with `make demo` (converted once per machine).
os.environ.setdefault("FINTS_CACHE_DIR", str(ROOT / ".cache"))


def compose(overrides: list[str]):
    """Compose the run config exactly as `python -m fints_repro.run <overrides>` would."""
    from fints_repro.compose import compose as compose_config

    return compose_config(overrides)


def assert_config_error(overrides: list[str], key: str) -> None:
    """Composing ``overrides`` fails at start-up with a ConfigError that names ``key``."""
    from fints_repro.compose import compose_run
    from fints_repro.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        compose_run(overrides)


def run(overrides: list[str], run_dir: Path) -> dict:
    """What `python -m fints_repro.run <overrides> run_dir=<run_dir>` does, in-process."""
    from fints_repro.compose import compose_run
    from fints_repro.pipeline import run_experiment

    return run_experiment(compose_run(overrides), run_dir, overrides)


# Runs of the tiny model generate one prompt at a time: its byte-level tokenizer makes
# prompts of thousands of tokens, and in a padded batch torch's CPU attention takes its
# math path (an L x L matrix per head), while one unpadded prompt takes the fused kernel:
# the same checks in a third of the time. Batched generation is checked against one prompt
# at a time on its own (tests/unit/test_generation.py, test_hooks.py), and the embedded
# model's end-to-end runs (tests/e2e/test_demo_end_to_end.py) generate in batches.
ONE_PROMPT_AT_A_TIME = ["generation.batch_size=1", "steering.pairs.batch_size=1"]


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """A tiny random model, tiny demo data, no tracker, caches in tmp_path."""
    return [
        "model=tiny_random_llama",
        "logger=none",
        f"cache_dir={tmp_path / 'cache'}",
        "dataset.demo.n_users=3",
        "dataset.demo.n_history=4",
        "dataset.demo.n_test=2",
        "dataset.max_new_tokens=6",
        "eval.bootstrap=50",
        "progress=false",
        *ONE_PROMPT_AT_A_TIME,
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and immune to a busy CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LANES = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items) -> None:
    """Each test carries its lane's marker (its folder: tests/unit, tests/integration,
    tests/e2e), so ``-m "not e2e"`` works across the tree; ``gpu`` tests are skipped where
    torch sees no CUDA device, ``vllm`` tests where vLLM is not installed. The slow lanes run first, so that with one worker per core
    (pytest-xdist) the longest tests do not start last and leave the other cores idle."""
    import torch

    import importlib.util

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    has_gpu = torch.cuda.is_available()
    no_vllm = pytest.mark.skip(reason="needs vLLM: `make install VLLM=1` (a second environment: "
                               "make install VLLM=1 VENV=.venv-vllm; make test-vllm VENV=.venv-vllm)")
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in LANES:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(no_vllm)
    first = {"e2e": 0, "integration": 1, "unit": 2}
    items.sort(key=lambda it: first.get(
        Path(str(it.fspath)).relative_to(ROOT / "tests").parts[0], 3))
