"""reward model: small runs (the unit checks: tests.unit.test_reward_model)."""

from __future__ import annotations
import json
import pytest
pytest.importorskip("peft")
pytest.importorskip("trl")
from fints_repro.config import (EvalConfig, GenerationConfig,  # noqa: E402
                                )
from fints_repro.tasks import build_task
from tests.conftest import run
pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_model_trained_judge_and_steered_through_the_pipeline(tiny_overrides,
                                                                     tmp_path) -> None:
    from fints_repro.compose import compose_run

    methods = ("methods=[{backbone: reward_model}, "
               "{backbone: reward_model, steering: fine_grained, name: reward_model+fine_grained}, "
               "{backbone: reward_model, name: reward_model_judge, "
               "overrides: {backbone.reward_model.reward: judge}}]")
    ov = ["+exp=demo", "fidelity=ours", *tiny_overrides, methods, "backbone.reward_model.n=3",
          "backbone.reward_model.train.epochs=1", "backbone.reward_model.persona_max_new_tokens=8",
          "steering.pairs.attempts=1"]
    summary = run(ov, tmp_path / "run")
    m = summary["methods"]
    plain, steered, judged = m["reward_model"], m["reward_model+fine_grained"], m["reward_model_judge"]
    n = plain["n"]
    assert plain["backbone_n_candidates"] == n * 3
    assert plain["backbone_n_reward_models_trained"] == 3
    assert steered["backbone_n_reward_models_loaded"] == 3  # the same pairs, the same models
    assert steered["steering_n_pairs"] > 0 and steered["n_generated"] == n
    assert judged["n_cached"] == n  # the plain method's candidates: same prompts, same sampling
    assert judged["backbone_judge_calls"] + judged["backbone_judge_identical_skipped"] == n * 2
    task = build_task(compose_run(ov).dataset, GenerationConfig(), EvalConfig())
    for name in m:
        rows = [json.loads(x) for x in (tmp_path / "run" / name / "predictions.jsonl")
                .read_text().splitlines()]
        assert len(rows) == n
        for r in rows:
            assert len(r["candidates"]) == 3
            sel = r["selection"]
            assert len(sel["rewards"]) == 3 and all(isinstance(x, (int, float)) for x in sel["rewards"])
            assert r["generation"] == r["candidates"][sel["chosen"]]
            assert r["prediction"] == task.parse(r["generation"])
            if name != "reward_model_judge":
                assert sel["chosen"] == max(range(3), key=lambda j: (sel["rewards"][j], -j))
    rows = [json.loads(x) for x in (tmp_path / "run" / "reward_model" / "predictions.jsonl")
            .read_text().splitlines()]
    assert sum(len(set(r["candidates"])) > 1 for r in rows) >= n // 2
