"""A plug-in is one file: a copy of a steering method's module under another registered
name, plus a copy of its yaml, is a working `steering=<name>` with no other file edited."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ONE_PROMPT_AT_A_TIME

ROOT = Path(__file__).resolve().parents[2]

OVERRIDES = ["+exp=demo", "fidelity=ours", "model=tiny_random_llama", "logger=none", "progress=false",
             "dataset.demo.n_users=3", "dataset.demo.n_history=4", "dataset.demo.n_test=2",
             "dataset.max_new_tokens=6", "eval.bootstrap=0", "steering.layer=1",
             *ONE_PROMPT_AT_A_TIME,
             "methods=[{backbone: rag, steering: caa}, {backbone: rag, steering: caa_copy}]"]


def _copy_of_the_project(tmp: Path) -> Path:
    """The package and its config groups in ``tmp`` (``fints_repro.conf`` is the package's
    ``conf/``, as an installed fints_repro has it), with caa.py and caa.yaml copied."""
    pkg = tmp / "fints_repro"
    shutil.copytree(ROOT / "fints_repro", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", pkg / "conf")
    methods = pkg / "steering" / "methods"
    code = (methods / "caa.py").read_text()
    assert code.count('NAME = "caa"') == 1
    (methods / "caa_copy.py").write_text(code.replace('NAME = "caa"', 'NAME = "caa_copy"'))
    yaml = (pkg / "conf" / "steering" / "caa.yaml").read_text()
    assert yaml.count("name: caa\n") == 1
    (pkg / "conf" / "steering" / "caa_copy.yaml").write_text(
        yaml.replace("name: caa\n", "name: caa_copy\n"))
    return tmp


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tmp), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fints_repro.run", *OVERRIDES, f"cache_dir={tmp / 'cache'}",
         f"run_dir={tmp / 'run'}", f"hydra.run.dir={tmp / 'hydra'}", *extra],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def test_a_copied_steering_module_and_yaml_are_a_working_method(tmp_path: Path) -> None:
    tmp = _copy_of_the_project(tmp_path)
    proc = _run(tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp / "run" / "metrics.json").read_text())["methods"]
    original, copy = metrics["rag+caa"], metrics["rag+caa_copy"]
    assert copy["steering_n_samples_steered"] == original["steering_n_samples_steered"] > 0
    assert copy["steering_n_pairs"] == original["steering_n_pairs"]
    rows = {m: [json.loads(line)["prediction"] for line in
                (tmp / "run" / m / "predictions.jsonl").read_text().splitlines()]
            for m in ("rag+caa", "rag+caa_copy")}
    assert rows["rag+caa_copy"] == rows["rag+caa"]
    # its own settings node, checked by its own check
    bad = _run(tmp, "steering.caa_copy.min_pairs=0")
    assert bad.returncode != 0
    assert "steering.caa_copy.min_pairs=0: must be at least 1" in bad.stdout + bad.stderr
    # the copy ran from the copied tree, not the installed package
    assert not (ROOT / "fints_repro" / "steering" / "methods" / "caa_copy.py").exists()
