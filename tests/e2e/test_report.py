"""report: the CLI, the presets, the embedded demo (the unit checks: tests.unit.test_report)."""

from __future__ import annotations
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fints_repro.report import write_report
from tests.conftest import ROOT


def test_report_tables_from_a_seed_sweep_with_a_failed_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fints_repro.run", "-m", "+exp=demo_compare", "model=tiny_random_llama",
           "logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
           "dataset.demo.n_users=2", "dataset.demo.n_history=3", "dataset.demo.n_test=1",
           "dataset.max_new_tokens=4", "eval.bootstrap=20", "methods=[{backbone: rag}]",
           "seed=0,1", "backbone.k=1,2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    (jobs[-1] / "metrics.json").unlink()  # a job that died before writing its metrics
    out = write_report(sweep)
    rows = list(csv.DictReader(open(out["csv"])))
    assert len(rows) == 4
    assert [r["status"] for r in rows].count("failed") == 1
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["seed"], r["backbone.k"]) for r in ok} == {("0", "1"), ("0", "2"), ("1", "1")}
    for r in ok:  # the table's number is the job's
        job = json.loads((sweep / r["job"] / "metrics.json").read_text())
        assert float(r["rougeL"]) == pytest.approx(job["methods"][r["method"]]["rougeL"])
    seeds = out["seeds"].read_text()
    assert "| 1 | rag | 2 |" in seeds and "| 2 | rag | 1 |" in seeds
