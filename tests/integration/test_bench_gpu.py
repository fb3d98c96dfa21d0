"""``scripts/bench_gpu.py --tiny``: the GPU benchmark's code, end to end on the CPU with a
tiny config: every workload of its grid measured, per-row vectors that are all one vector
decode that vector's tokens (checked inside), the mixed-adapter batch decodes what one
adapter at a time does, and the speeds land in a throughput table ``plan`` reads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from fints_repro.throughput import read_table

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_tiny_gpu_benchmark_measures_its_whole_grid(tmp_path: Path) -> None:
    bench = _bench()
    result = bench.main(["--tiny", "--out", str(tmp_path), "--repeats", "1"])
    grid = bench.TINY_GRID
    shapes = [(g["prompt_tokens"], g["batch"]) for g in result["generation"]]
    assert shapes == [(p, b) for p in grid["prompts"] for b in grid["batches"]]
    for g in result["generation"]:
        for key in ("prefill_tokens_per_s", "unsteered_tokens_per_s", "per_row_tokens_per_s",
                    "shared_tokens_per_s", "per_row_vs_unsteered", "per_row_vs_shared"):
            assert g[key] > 0, key
    (lora,) = result["lora"]
    assert lora["equal_tokens"] and lora["adapters"] == lora["batch"] == 4
    assert json.loads((tmp_path / "bench.json").read_text())["generation"] == result["generation"]
    assert "| LoRA batch" in (tmp_path / "bench.md").read_text()
    table = read_table(tmp_path / "throughput.json")
    assert table and all(t.dtype == "bfloat16" and t.source.endswith("--tiny") for t in table)


def test_the_hooks_import_with_torch_alone() -> None:
    """What lets the benchmark run on a GPU machine with only torch, transformers, peft and
    accelerate: the hooks (and the throughput table) pull in none of the project's other
    dependencies."""
    code = ("import sys, fints_repro.steering.hooks, fints_repro.throughput; "
            "print(sorted(m for m in ('omegaconf', 'hydra', 'transformers', 'datasets', "
            "'fints_repro.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
