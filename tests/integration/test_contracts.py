"""Contracts every registered component keeps, checked over each registry's entries (a new
one is covered as soon as it registers):

- a steering method returns a well-formed plan, and its rows without vectors generate
  exactly what the unsteered backbone generates;
- a backbone honours the lifecycle (stages fit → prompts → generate → select → close) and
  leaves the run's model as it found it;
- a task scores a hand-made prediction to the hand-computed value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fints_repro.backbones import BACKBONES, build_backbone
from fints_repro.steering import STEERING
from fints_repro.tasks import TASKS
from tests.conftest import run

def _ours(registry) -> list[str]:
    """The entries the package registers (tests register probes of their own)."""
    return [n for n in registry.names() if registry.origin(n).startswith("fints_repro.")]


# Small settings for the methods that train (the contract, not the quality, is checked).
FAST = {"bipo": ["steering.bipo.max_steps=2"], "steerx": ["steering.steerx.base=caa"]}
BACKBONE_FAST = {
    "lora": ["backbone.lora.train.epochs=1", "backbone.lora.train.max_length=64"],
    "reward_model": ["backbone.reward_model.n=2", "backbone.reward_model.train.epochs=1",
                     "backbone.reward_model.train.max_length=64"],
}


def _rows(run_dir: Path, method: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / method / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", [n for n in _ours(STEERING) if n != "none"])
def test_every_steering_method_gives_a_well_formed_plan_whose_empty_rows_are_no_ops(
        name: str, tiny_overrides, tmp_path: Path) -> None:
    over = ["+exp=demo", "fidelity=ours", *tiny_overrides, "steering.layer=1",
            "steering.pairs.max_new_tokens=4", *FAST.get(name, []),
            f"methods=[{{backbone: rag}}, {{backbone: rag, steering: {name}, name: steered}}]"]
    summary = run(over, tmp_path / "run")
    m, n = summary["methods"]["steered"], summary["n_samples"]
    assert m["steering_n_samples_steered"] + m["steering_n_samples_unsteered"] == n
    assert m["steering_n_samples_steered"] > 0
    rag, steered = _rows(tmp_path / "run", "rag"), _rows(tmp_path / "run", "steered")
    assert [r["id"] for r in steered] == [r["id"] for r in rag]
    assert sum(r["steering"]["steered"] for r in steered) == m["steering_n_samples_steered"]

    # one user alone has no other users' items to make pairs with: no row has a vector,
    # and every row is the unsteered backbone's, token for token (read from its cache)
    lone = [o for o in over if not o.startswith("dataset.demo.n_users=")] + ["dataset.demo.n_users=1"]
    summary = run(lone, tmp_path / "lone")
    m = summary["methods"]["steered"]
    assert m["steering_n_samples_steered"] == 0
    assert m["n_cached"] == summary["n_samples"] and m["n_generated"] == 0
    assert ([r["generation"] for r in _rows(tmp_path / "lone", "steered")]
            == [r["generation"] for r in _rows(tmp_path / "lone", "rag")])


@pytest.mark.parametrize("name", _ours(BACKBONES))
def test_every_backbone_honours_the_lifecycle_and_leaves_the_model_as_found(
        name: str, tiny_overrides, tmp_path: Path) -> None:
    from fints_repro import stages

    ctx = stages.open_run(["+exp=demo", "fidelity=ours", *tiny_overrides, "methods=[]",
                           f"backbone={name}", "steering.pairs.max_new_tokens=4",
                           *BACKBONE_FAST.get(name, [])])
    base = ctx.lm
    before = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in base.model.modules())
    method = stages.config_method(ctx.cfg)
    backbone = build_backbone(method.backbone, ctx.task, ctx.retriever)
    try:
        lm = stages.fit(ctx, method, backbone, base)
        params = stages.decoding(ctx, method, backbone, base)
        prompts = stages.build_prompts(ctx, method, backbone, lm, params)
        assert len(prompts.prompts) == len(prompts.texts) == len(ctx.samples)
        generated = stages.generate(ctx, method, backbone, lm, prompts, None, tmp_path)
        assert backbone.n_candidates >= 1
        assert all(len(c) == backbone.n_candidates for c in generated.candidates)
        selected = stages.select(ctx, method, backbone, generated)
        assert len(selected.chosen) == len(selected.info) == len(ctx.samples)
        assert all(0 <= j < backbone.n_candidates for j in selected.chosen)
        assert selected.raw == [c[j] for c, j in zip(generated.candidates, selected.chosen)]
    finally:
        backbone.close(base)
    after = base.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks)
               for mod in base.model.modules()) == hooks
    assert not base.model.training


def _text_gen_case():
    from fints_repro.compose import compose_run
    from fints_repro.config import EvalConfig, GenerationConfig
    from fints_repro.data.schema import Sample
    from fints_repro.tasks import build_task

    task = build_task(compose_run(["dataset=demo_news"]).dataset, GenerationConfig(), EvalConfig())
    samples = [Sample(f"s{i}", "u", "Generate a headline for the following article: x", "A b d", ())
               for i in range(2)]
    # ROUGE-1 of "a b c" (stripped, lower-cased by the tokenizer) against "a b d": 2 of 3
    # unigrams on both sides, F = 2/3; ROUGE-L: LCS "a b", F = 2/3. With the line after it
    # kept (the demo's post-processing strips, it keeps every line): P = 2/5, R = 2/3, F = 1/2
    return task, samples, ["  A b c \n", "A b c\nx y"], [{"rouge1": 2 / 3, "rougeL": 2 / 3},
                                                         {"rouge1": 0.5, "rougeL": 0.5}]


def _function_calling_case():
    from fints_repro.compose import compose_run
    from fints_repro.config import EvalConfig, GenerationConfig
    from fints_repro.data.load import load_samples
    from fints_repro.tasks import build_task
    from tests.conftest import FIXTURES

    d = compose_run(["dataset=pwab"]).dataset
    d.path = str(FIXTURES / "pwab")
    task = build_task(d, GenerationConfig(), EvalConfig())
    samples = load_samples(d, seed=0)[:2]
    # no call at all: nothing to run, 0 and 0; a tool the benchmark does not have: 0 and 0
    preds = ["I cannot help with that.",
             json.dumps({"tool_call": {"name": "buy_it_now", "arguments": {}}})]
    return task, samples, preds, [
        {"function_accuracy": 0, "result_accuracy": 0.0, "call_error": "unparseable"},
        {"function_accuracy": 0, "result_accuracy": 0.0, "call_error": "unknown_tool"}]


def _text_style_case():
    from dataclasses import replace

    from fints_repro.compose import compose_run
    from fints_repro.config import EvalConfig, GenerationConfig
    from fints_repro.data.schema import Sample
    from fints_repro.tasks import build_task

    task = build_task(compose_run(["dataset=demo_style"]).dataset, GenerationConfig(), EvalConfig())
    s = Sample("s", "u", "Generate a headline for the following article: x", "No way! A b won!", ())
    samples = [replace(s, id=f"s{i}", meta={"preference": p}, type=t) for i, (p, t) in
               enumerate([("casual", "casual"), ("formal", "topic_formal"), ("casual", "casual")])]
    # "Wow, a b won!": casual ("!", "wow") and positive ("won"); its NLL 1.2 is under the
    # limit (5.0): style 1. "A b won title": formal, fluent: style 1. The third is casual
    # but its NLL (6.0) is above the limit: not fluent, style 0. ROUGE-1 of the first
    # ("wow a b won") against "no way a b won": 3 shared unigrams, P = 3/4, R = 3/5, F = 2/3.
    return task, samples, ["Wow, a b won!", "A b won title", "Wow, a b won!"], [
        {"style": 1.0, "casual": 1.0, "positive": 1.0, "fluent": 1.0, "nll": 1.2,
         "rouge1": 2 / 3},
        {"style": 1.0, "casual": 0.0, "positive": 1.0, "fluent": 1.0, "nll": 0.9},
        {"style": 0.0, "casual": 0.0, "positive": 0.0, "fluent": 0.0, "nll": 6.0}], \
        {"nll": [1.2, 0.9, 6.0]}


CASES = {"text_gen": _text_gen_case, "function_calling": _function_calling_case,
         "text_style": _text_style_case}


def test_every_task_has_a_hand_made_case() -> None:
    assert sorted(_ours(TASKS)) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_task_scores_a_hand_made_prediction(name: str) -> None:
    task, samples, generations, want, *values = CASES[name]()  # values: the task's model_values
    scores = task.score([task.parse(g) for g in generations], samples, seed=0,
                        values=values[0] if values else None)
    assert len(scores.per_sample) == len(want) == len(samples)
    for got, expected in zip(scores.per_sample, want):
        for k, v in expected.items():
            assert got[k] == (pytest.approx(v) if isinstance(v, float) else v), (name, k, got)
