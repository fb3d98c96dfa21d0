"""lora: small runs (the unit checks: tests.unit.test_lora)."""

from __future__ import annotations
import json
import pytest
pytest.importorskip("peft")
from tests.conftest import run
pytestmark = pytest.mark.usefixtures("one_thread")


def test_lora_and_lora_plus_steering_through_the_pipeline(tiny_overrides, tmp_path) -> None:
    methods = ("methods=[{backbone: zero_shot}, {backbone: lora}, "
               "{backbone: lora, steering: fine_grained, name: lora+fine_grained}]")
    ov = ["+exp=demo", "fidelity=ours", *tiny_overrides, methods, "backbone.lora.train.epochs=1",
          "steering.pairs.attempts=1"]
    summary = run(ov, tmp_path / "run")
    m = summary["methods"]
    assert m["lora"]["n_generated"] == m["lora"]["n"]  # nothing reused from zero-shot's cache
    assert m["lora"]["backbone_n_adapters_trained"] == 3
    assert m["lora+fine_grained"]["backbone_n_adapters_loaded"] == 3
    rows = {name: [json.loads(x) for x in (tmp_path / "run" / name / "predictions.jsonl")
                   .read_text().splitlines()] for name in m}
    assert [r["prompt"] for r in rows["lora"]] == [r["prompt"] for r in rows["zero_shot"]]
    assert [r["cache_key"] for r in rows["lora"]] != [r["cache_key"] for r in rows["zero_shot"]]
    assert m["lora+fine_grained"]["steering_n_pairs"] > 0
