"""SIGTERM and SIGINT (fints_repro/signals.py): a real run stopped by SIGTERM keeps what it
finished, closes its wandb run marked preempted with the config in it, writes INTERRUPTED,
exits 143, and the same command resumes it to the predictions an uninterrupted run makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fints_repro.signals import Interrupted, stop_on_signals
from tests.conftest import ROOT, run
from tests.unit.test_tracking import _config, _exit_codes, _offline_run, _records, _summary

OVERRIDES = ["+exp=demo_compare", "methods=[{backbone: zero_shot}]", "model=tiny_random_llama",
             "dataset.demo.n_users=3", "dataset.demo.n_history=3", "dataset.demo.n_test=8",
             "dataset.max_new_tokens=40", "generation.batch_size=1", "eval.bootstrap=50",
             "progress=false"]


def _rows(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigterm_stops_a_real_run_and_the_same_command_resumes_it(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, "-m", "fints_repro.run", *OVERRIDES, "logger=wandb",
               f"cache_dir={cache}", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    predictions = run_dir / "zero_shot" / "predictions.jsonl"
    deadline = time.time() + 180
    while _rows(predictions) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "stopped by SIGTERM" in out and "the same command resumes the run" in out
    marker = (run_dir / "INTERRUPTED").read_text()
    assert marker.startswith("stopped by SIGTERM at ")
    assert not (run_dir / "metrics.json").exists()
    kept = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert 2 <= len(kept) < 24  # the batches finished before the signal, whole
    # the tracker closed: the config in it, marked preempted, the signal's exit code
    records = _records(_offline_run(run_dir))
    assert _config(records)["dataset"]["name"] == "demo_news"
    assert any(r.get("type") == "preempting" for r in records)
    assert _exit_codes(records) == [143]
    assert _summary(records)["run_status"] == "preempted"

    # the same command again (in-process here): it resumes, and ends where an
    # uninterrupted run ends
    summary = run([*OVERRIDES, "logger=none", f"cache_dir={cache}"], run_dir)
    m = summary["methods"]["zero_shot"]
    assert m["n_cached"] == len(kept) and m["n_generated"] == 24 - len(kept)
    assert not (run_dir / "INTERRUPTED").exists()
    fresh = run([*OVERRIDES, "logger=none", f"cache_dir={tmp_path / 'fresh-cache'}"],
                tmp_path / "fresh")
    lines = [json.loads(x) for x in predictions.read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "fresh" / "zero_shot" / "predictions.jsonl")
             .read_text().splitlines()]
    assert [(r["id"], r["generation"]) for r in lines] == [(r["id"], r["generation"]) for r in again]
    assert fresh["methods"]["zero_shot"]["rougeL"] == m["rougeL"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_interrupted_once_and_the_handlers_are_restored(signum, code) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info:
        with stop_on_signals():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises before this ends
            finally:
                # while the run unwinds, another signal is logged, not raised
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
    assert info.value.signum == signum and info.value.exit_code == code
    assert not isinstance(info.value, Exception)  # no `except Exception` swallows it
    assert {s: signal.getsignal(s) for s in before} == before
