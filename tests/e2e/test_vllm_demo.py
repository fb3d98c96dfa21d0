"""``engine=vllm`` on the embedded demo end to end (marked ``vllm``: skipped without vLLM):
the zero-shot and RAG rows and the pair generations on vLLM, the steered rows on the
hooks, every row equal to ``engine=hf``'s (what docs/engines.md measured on the whole demo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run

from .test_demo_end_to_end import _cache

pytestmark = pytest.mark.vllm

SMALL = ["+exp=demo", "logger=none", "progress=false", "eval.bootstrap=50",
         "dataset.demo.n_users=3", "dataset.demo.n_history=6", "dataset.demo.n_test=2"]


def _rows(run_dir: Path, method: str) -> dict[str, list[str]]:
    return {r["id"]: r["candidates"] for r in map(json.loads, (run_dir / method / "predictions.jsonl")
                                                  .read_text().splitlines())}


def test_engine_vllm_gives_engine_hfs_rows_on_the_demo(tmp_path: Path) -> None:
    data = f"dataset.path={tmp_path / 'data'}"
    hf = run([*SMALL, data, _cache(tmp_path, "c_hf")], tmp_path / "hf")
    vl = run([*SMALL, data, _cache(tmp_path, "c_vllm"), "engine=vllm"], tmp_path / "vllm")
    assert vl["engine"] == "vllm" and hf["engine"] == "hf"
    for method in hf["methods"]:
        assert _rows(tmp_path / "vllm", method) == _rows(tmp_path / "hf", method), method
        assert vl["methods"][method]["rougeL"] == hf["methods"][method]["rougeL"]
    # the steered rows were steered: pairs were made (by vLLM) and vectors added
    assert vl["methods"]["rag+caa(ours)"]["steering_n_pairs"] > 0
