"""Experiment tracking: an offline wandb run is written under the run dir with its metrics
and config, a failing block still closes the run and marks it failed, logger=none is a
no-op tracker.

wandb >= 0.2x offline runs write no wandb-summary.json / config.yaml: everything goes to
the run's transaction log (run-<id>.wandb). The tests read that log back with
`wandb leet inspect --json`, one record per line (run, summary, exit, ...)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fints_repro.config import LoggerConfig
from fints_repro.errors import ConfigError
from fints_repro.tracking import NullTracker, WandbTracker, open_tracker

os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_MODE"] = "offline"
wandb = pytest.importorskip("wandb")

WANDB_CLI = shutil.which("wandb", path=str(Path(sys.executable).parent)) or shutil.which("wandb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")


def _offline_run(run_dir: Path) -> Path:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _records(run: Path) -> list[dict]:
    [log] = run.glob("run-*.wandb")
    assert WANDB_CLI, "wandb CLI not found"
    out = subprocess.run([WANDB_CLI, "leet", "inspect", "--json", str(log)], check=True,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _summary(records: list[dict]) -> dict:
    summary: dict = {}
    for r in records:
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def _config(records: list[dict]) -> dict:
    [run] = [r["run"] for r in records if r.get("type") == "run"]
    return run["config"]["update"]


def _exit_codes(records: list[dict]) -> list[int]:
    return [r["exit"].get("exit_code", 0) for r in records if r.get("type") == "exit"]


def _summary_file(run: Path) -> dict | None:
    f = run / "files" / "wandb-summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def test_wandb_offline_run_holds_metrics_and_config(tmp_path: Path) -> None:
    cfg = LoggerConfig(name="wandb", mode="offline", tags=["unit"])
    config = {"model": {"name": "tiny"}, "seed": 7}
    with open_tracker(cfg, run_dir=tmp_path, config=config, name="ok-run") as tracker:
        assert isinstance(tracker, WandbTracker)
        assert wandb.run is not None and wandb.run.name == "ok-run"
        tracker.log_metrics({"rougeL": 0.25, "rouge1": 0.5, "note": "text"})
        tracker.log_table("predictions", [{"id": "a", "scores": {"r": 1}}])
        tracker.log_curve("bipo_loss_curve", [0.69, 0.5, 0.4])
    assert wandb.run is None

    run = _offline_run(tmp_path)
    records = _records(run)
    summary = _summary(records)
    assert summary["rougeL"] == pytest.approx(0.25) and summary["rouge1"] == pytest.approx(0.5)
    assert summary["note"] == "text"
    # Nested summary values come back as dotted keys.
    assert summary["predictions._type"] == "table-file"
    assert list((run / "files" / "media" / "table").glob("predictions_*.table.json"))
    [curve] = (run / "files" / "media" / "table").glob("bipo_loss_curve_table_*.table.json")
    assert json.loads(curve.read_text())["data"] == [[0, 0.69], [1, 0.5], [2, 0.4]]
    conf = _config(records)
    assert conf["model"] == {"name": "tiny"} and conf["seed"] == 7
    assert _exit_codes(records) == [0]
    # Older wandb versions also write the summary file.
    if (file_summary := _summary_file(run)) is not None:
        assert file_summary["rougeL"] == pytest.approx(0.25)


def test_wandb_run_is_closed_and_failed_when_the_block_raises(tmp_path: Path) -> None:
    cfg = LoggerConfig(name="wandb", mode="offline")
    with pytest.raises(RuntimeError, match="boom"):
        with open_tracker(cfg, run_dir=tmp_path, config={"seed": 1}) as tracker:
            tracker.log_metrics({"rougeL": 0.5})
            raise RuntimeError("boom")
    assert wandb.run is None

    records = _records(_offline_run(tmp_path))
    assert _exit_codes(records) == [1]
    assert _summary(records)["rougeL"] == pytest.approx(0.5)
    assert _summary(records)["run_status"] == "failed"

    # The next run opens cleanly after the failed one.
    with open_tracker(cfg, run_dir=tmp_path / "next", config={}) as tracker:
        tracker.log_metrics({"x": 1})
    assert _exit_codes(_records(_offline_run(tmp_path / "next"))) == [0]


def test_a_run_stopped_by_a_signal_is_closed_as_preempted(tmp_path: Path) -> None:
    from fints_repro.signals import Interrupted

    cfg = LoggerConfig(name="wandb", mode="offline")
    with pytest.raises(Interrupted):
        with open_tracker(cfg, run_dir=tmp_path, config={"seed": 3}) as tracker:
            tracker.log_metrics({"rougeL": 0.5})
            raise Interrupted(15)
    assert wandb.run is None
    records = _records(_offline_run(tmp_path))
    assert [r["type"] for r in records if r.get("type") == "preempting"] == ["preempting"]
    assert _exit_codes(records) == [143]
    assert _summary(records)["run_status"] == "preempted" and _config(records)["seed"] == 3


@pytest.mark.parametrize("cfg", [LoggerConfig(name="none"),
                                 LoggerConfig(name="wandb", mode="disabled")])
def test_null_tracker_accepts_the_calls(tmp_path: Path, cfg: LoggerConfig) -> None:
    with open_tracker(cfg, run_dir=tmp_path, config={"a": 1}) as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_metrics({"rougeL": 0.1, "note": "x"})
        tracker.log_table("t", [{"a": 1}])
        tracker.log_table("t", [])
        tracker.log_curve("c", [1.0])
    assert wandb.run is None
    assert not (tmp_path / "wandb").exists()


def test_unknown_logger_name_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown logger.name='mlflow'"):
        with open_tracker(LoggerConfig(name="mlflow"), run_dir=tmp_path, config={}):
            pass
