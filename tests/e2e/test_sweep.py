"""A 2 × 2 multirun (layer × strength) on a tiny model through the real CLI: every job
runs (fidelity=ours: a random tiny model writes no print("...") line for the authors'
pair parser), pairs and vectors are computed once per layer and reused (asserted from the cache),
the report has one row per job and plots that decode, and a failing job is reported as
failed without stopping the others."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import matplotlib.image as mpimg

from fints_repro.steering.store import vector_metadata
from tests.conftest import ROOT

BASE = ["model=tiny_random_llama", "fidelity=ours", "logger=none", "progress=false", "dataset.demo.n_users=3",
        "dataset.demo.n_history=3", "dataset.demo.n_test=1", "dataset.max_new_tokens=4",
        "dataset.history_max_words=8", "dataset.pair_k_other=1", "steering.pairs.attempts=1",
        "eval.bootstrap=20", "methods=[{backbone: rag, steering: fine_grained}]"]


def _multirun(tmp_path: Path, sweep: list[str], name: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fints_repro.run", "-m", "+exp=demo_sweep", *BASE,
           f"cache_dir={tmp_path / 'cache'}", *sweep, f"hydra.sweep.dir={out}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600), out


def test_grid_reuses_pairs_and_vectors_and_reports(tmp_path: Path) -> None:
    proc, out = _multirun(tmp_path, ["steering.layer=1,2", "steering.scale=1,4"], "grid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "cache"
    assert len(list((cache / "pairs").glob("*.jsonl"))) == 1  # one pair set for the sweep
    vectors = sorted((cache / "vectors").glob("*.safetensors"))
    assert sorted(vector_metadata(v)["layer"] for v in vectors) == [1, 2]  # one per layer
    logs = [(out / str(i) / "run.log").read_text() for i in range(4)]
    extracted = [bool(re.search(r"extracted \d+ pair vectors", t)) for t in logs]
    loaded = [bool(re.search(r"loaded \d+ pair vectors", t)) for t in logs]
    # jobs run layer-major: the first job of each layer extracts, the second loads
    assert extracted == [True, False, True, False] and loaded == [False, True, False, True]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {(r["steering.layer"], r["steering.scale"]) for r in rows} == {
        ("1", "1"), ("1", "4"), ("2", "1"), ("2", "4")}
    for png in ("heatmap_rougeL.png", "vs_steering.layer.png", "vs_steering.scale.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_a_failing_job_is_reported_and_the_others_run(tmp_path: Path) -> None:
    proc, out = _multirun(tmp_path, ["steering.layer=1,99"], "fail")  # 99: outside the model
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["steering.layer"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    job = json.loads((out / rows["1"]["job"] / "metrics.json").read_text())
    assert rows["1"]["status"] == "ok"
    assert float(rows["1"]["rougeL"]) == pytest.approx(job["methods"][rows["1"]["method"]]["rougeL"])
    assert rows["99"]["status"] == "failed" and "outside the model" in rows["99"]["error"]


def test_slurm_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_module

    from fints_repro.compose import register_configs

    register_configs()
    with initialize_config_module(config_module="fints_repro.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm_gpu",
                                           "hydra.launcher.partition=gpu", "hydra.launcher.gres=gpu:1",
                                           "hydra.launcher.mem_gb=80", "shard.count=8"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gres, cfg.hydra.launcher.mem_gb) == ("gpu", "gpu:1", 80)
    assert cfg.shard.count == 8
    assert "submitit" in cfg.hydra.launcher._target_.lower()
