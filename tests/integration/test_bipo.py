"""bipo: small runs (the unit checks: tests.unit.test_bipo)."""

from __future__ import annotations
import json
from pathlib import Path
import pytest
import torch
from tests.conftest import run


def test_bipo_runs_through_the_pipeline_and_caches_its_vectors(tiny_overrides, tmp_path: Path) -> None:
    over = ["+exp=demo", *tiny_overrides, "fidelity=ours", "steering=bipo", "steering.layer=1",
            "steering.pairs.max_new_tokens=4", "steering.bipo.max_steps=3",
            "methods=[{backbone: rag, steering: bipo}]"]
    summary = run(over, tmp_path / "run")
    m = summary["methods"]["rag+bipo"]
    assert len(m["steering_bipo_loss_curve"]) == 3 and m["steering_n_vectors"] >= 1
    assert m["steering_bipo_loss_first"] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)
    cached = sorted((tmp_path / "cache" / "vectors").glob("bipo-*.safetensors"))
    assert len(cached) == m["steering_n_vectors"]
    from safetensors.torch import load_file
    norms = [load_file(p)["v"][0].norm().item() for p in cached]
    assert m["steering_bipo_vector_norm_mean"] == pytest.approx(sum(norms) / len(norms), rel=1e-6)
    assert m["steering_bipo_vector_norm_mean"] > 0
    stamp = [p.stat().st_mtime_ns for p in cached]
    again = run(over, tmp_path / "run2")["methods"]["rag+bipo"]
    assert [p.stat().st_mtime_ns for p in cached] == stamp  # loaded, not trained again
    assert again["steering_bipo_loss_curve"] == m["steering_bipo_loss_curve"]
    rows = [json.loads(x) for x in (tmp_path / "run2" / "rag+bipo" / "predictions.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (tmp_path / "run" / "rag+bipo" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in first]
    # scope=all: one vector for everyone
    all_ = run([*over, "steering.bipo.scope=all"], tmp_path / "run3")["methods"]["rag+bipo"]
    assert all_["steering_n_vectors"] == 1
