"""steerx: small runs (the unit checks: tests.unit.test_steerx)."""

from __future__ import annotations
import json
from pathlib import Path
import pytest
from tests.conftest import run
from tests.unit.test_steerx import _preds  # noqa: E402


@pytest.mark.parametrize("backbone, extra", [
    ("caa", []), ("fine_grained", []), ("bipo", ["steering.bipo.max_steps=2"])])
def test_every_token_selected_reduces_to_the_backbone_bit_for_bit(backbone, extra, tiny_overrides,
                                                                  tmp_path: Path) -> None:
    """tau = -inf: the backbone's vectors exactly, so every SteerX row's generation key is
    the backbone's (all rows come from the cache) and the predictions are the same."""
    over = ["+exp=demo", *tiny_overrides, "fidelity=ours", "steering.layer=1",
            "steering.pairs.max_new_tokens=4", *extra,
            f"methods=[{{backbone: rag, steering: {backbone}}}, {{backbone: rag, steering: steerx, "
            f"name: sx, overrides: {{steering.steerx.base: {backbone}, steering.steerx.token_threshold: -inf}}}}]"]
    summary = run(over, tmp_path / "run")
    sx, base = summary["methods"]["sx"], summary["methods"][f"rag+{backbone}"]
    assert sx["steering_steerx_token_share"] == 1.0
    assert sx["n_cached"] == sx["n"] and sx["n_generated"] == 0
    assert _preds(tmp_path / "run", "sx") == _preds(tmp_path / "run", f"rag+{backbone}")
    assert base["steering_n_samples_steered"] > 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "sx" / "predictions.jsonl").read_text().splitlines()]
    assert sx["steering_steerx_n_descriptions"] > 0  # written, shown, and not steered with
    assert any(r["steering"]["steerx_description"] and r["steering"]["steerx_tokens"] for r in rows)
    if backbone == "caa":  # and a finite tau selects fewer tokens, which changes the vectors
        over[-1] = over[-1].replace("-inf", "0.0")
        sel = run(over, tmp_path / "run2")["methods"]["sx"]
        assert sel["steering_steerx_token_share"] < 1.0 and sel["n_generated"] > 0
        # the description's vector on top changes them again
        over[-1] = over[-1].replace("token_threshold: 0.0", "token_threshold: 0.0, steering.steerx.use_description: true")
        desc = run(over, tmp_path / "run3")["methods"]["sx"]
        assert desc["steering_steerx_n_users_with_description_vector"] > 0
        assert desc["n_generated"] > 0
