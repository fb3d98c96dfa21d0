"""End-to-end runs on a tiny random model and tiny data: every preset smoke-runs, outputs
are complete, a rerun resumes from the cache with identical predictions, bad input fails
with a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fints_repro.errors import ConfigError, MissingDataError
from tests.conftest import CONF_DIR, FIXTURES, run

EXPS = sorted(p.stem for p in (CONF_DIR / "exp").glob("*.yaml"))


def _run(overrides: list[str], run_dir: Path) -> dict:
    return run(overrides, run_dir)


def _predictions(run_dir: Path, method: str) -> list[dict]:
    lines = (run_dir / method / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_threads_sets_torchs_cpu_threads_for_the_run_only(tiny_overrides, tmp_path: Path) -> None:
    """`threads=1` runs with one torch thread (metrics.json says so) and gives the caller's
    setting back; without it the run keeps the caller's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        over = ["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: rag}]"]
        assert _run([*over, "threads=1"], tmp_path / "one")["threads"] == 1
        assert torch.get_num_threads() == 2
        assert _run(over, tmp_path / "default")["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_rag_prompt_holds_the_retrieved_history(tiny_overrides, tmp_path: Path) -> None:
    summary = _run(["+exp=demo", *tiny_overrides, "backbone.k=2",
                    "methods=[{backbone: zero_shot}, {backbone: rag}]"], tmp_path / "run")
    rag = _predictions(tmp_path / "run", "rag")
    zero = _predictions(tmp_path / "run", "zero_shot")
    assert summary["n_empty_history"] == 0
    for r, z in zip(rag, zero):
        assert len(r["history_ids"]) == 2 and z["history_ids"] == []
        assert len(r["prompt"]) > len(z["prompt"])
        assert "is the title for" in r["prompt"] and "is the title for" not in z["prompt"]


def test_rerun_resumes_from_cache_with_identical_predictions(tiny_overrides, tmp_path: Path) -> None:
    overrides = ["+exp=demo", *tiny_overrides]  # two unsteered methods, two steered
    first = _run(overrides, tmp_path / "a")
    assert first["methods"]["rag"]["n_generated"] == first["n_samples"]
    # Simulate a run killed mid-way: keep half of the cached generations.
    store = next((tmp_path / "cache" / "generations").glob("*.jsonl"))
    lines = store.read_text().splitlines()
    store.write_text("\n".join(lines[: len(lines) // 2]) + "\n{\"key\": \"trunc")
    second = _run(overrides, tmp_path / "b")
    for method in first["methods"]:
        assert _predictions(tmp_path / "a", method) == _predictions(tmp_path / "b", method)
        assert first["methods"][method]["rougeL"] == second["methods"][method]["rougeL"]
    total_generated = sum(m["n_generated"] for m in second["methods"].values())
    assert total_generated == len(lines) - len(lines) // 2


def test_missing_real_data_says_what_it_looked_for(tiny_overrides, tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as e:
        _run(["+exp=lamp_news", *tiny_overrides, f"data.root={tmp_path / 'nowhere'}",
              "steering.layer=1"], tmp_path / "run")
    msg = str(e.value)
    assert "dev_questions.json" in msg and str(tmp_path / "nowhere") in msg
    assert "scripts/download_data.py lamp4" in msg
    assert msg.endswith("To try the framework without real data: python -m fints_repro.run +exp=demo")


def test_unknown_method_option_fails_before_any_model_time(tiny_overrides, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no backbone option 'nope'"):
        _run(["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: nope}]"], tmp_path / "run")


def test_rerun_into_the_same_run_dir_resumes_from_its_predictions(tiny_overrides, tmp_path: Path) -> None:
    overrides = ["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: rag}]"]
    first = _run(overrides, tmp_path / "run")
    before = _predictions(tmp_path / "run", "rag")
    # Killed mid-way, cache gone: the run dir holds the first rows only, the last one cut short.
    import shutil

    shutil.rmtree(tmp_path / "cache" / "generations")
    kept = [{k: r[k] for k in ("id", "user", "prompt", "cache_key", "candidates", "target")}
            for r in before[:3]]  # what a run appends per batch
    text = "".join(json.dumps(r) + "\n" for r in kept) + '{"id": "cut'
    (tmp_path / "run" / "rag" / "predictions.jsonl").write_text(text)
    second = _run(overrides, tmp_path / "run")
    assert second["methods"]["rag"]["n_cached"] == 3
    assert second["methods"]["rag"]["n_generated"] == first["n_samples"] - 3
    assert _predictions(tmp_path / "run", "rag") == before


def test_selecting_an_unknown_user_names_it(tiny_overrides, tmp_path: Path) -> None:
    from fints_repro.errors import DataError

    with pytest.raises(DataError, match="nobody_42"):
        _run(["+exp=lamp_news", *tiny_overrides, f"data.root={FIXTURES}", "steering.layer=1",
              "dataset.users=[nobody_42]"], tmp_path / "run")
    summary = _run(["+exp=demo_compare", *tiny_overrides, "dataset.users=[demo_user_01]"], tmp_path / "ok")
    assert summary["n_users"] == 1


def test_a_run_under_a_device_map_gives_the_whole_models_rows(tiny_overrides, tmp_path: Path) -> None:
    """model.device_map through the whole pipeline (generation, pair vectors, per-row
    steering), with the steered layers offloaded to disk: the same rows as the model in one
    piece, each computed afresh (separate caches)."""
    split = ("{model.embed_tokens: cpu, model.rotary_emb: cpu, model.layers.0: cpu, "
             "model.layers.1: disk, model.layers.2: disk, model.layers.3: cpu, model.norm: cpu, "
             "lm_head: cpu}")
    over = ["+exp=demo", *tiny_overrides, "methods=[{backbone: rag}, {backbone: rag, steering: "
            "fine_grained}]", "steering.layer=2", "dataset.demo.n_users=2"]
    whole = _run([*over, f"cache_dir={tmp_path / 'c1'}"], tmp_path / "whole")
    mapped = _run([*over, f"cache_dir={tmp_path / 'c2'}", f"model.device_map={split}"],
                  tmp_path / "mapped")
    for method in ("rag", "rag+fine_grained"):
        assert mapped["methods"][method]["n_generated"] == mapped["n_samples"]
        assert _predictions(tmp_path / "mapped", method) == _predictions(tmp_path / "whole", method)
    assert whole["methods"]["rag+fine_grained"]["rougeL"] == mapped["methods"]["rag+fine_grained"]["rougeL"]
    offloaded = list((tmp_path / "c2" / "offload").rglob("*.dat"))
    assert offloaded  # the layers really went to disk
