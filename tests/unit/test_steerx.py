"""SteerX: the token-level causal effect against a direct recomputation (and read back
from its cache unchanged), the selection rule, the tokens a description is written from,
the description's vector against a direct recomputation, and the reduction to its
backbone, bit for bit, when every token is selected."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fints_repro.steering.methods.steerx as steerx_mod
from fints_repro.preferences.pairs import Pair
from fints_repro.steering.methods.steerx import causal_effects, preference_tokens, select_tokens
from tests.conftest import assert_config_error


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from fints_repro.compose import compose_run
    from fints_repro.models.loading import load_model

    cache = tmp_path_factory.mktemp("cache")
    return load_model(compose_run(["model=tiny_random_llama", f"cache_dir={cache}"]).model, str(cache))


def test_causal_effect_equals_a_direct_recomputation(lm) -> None:
    tok, model = lm.tokenizer, lm.model
    pairs = [Pair("u", "a", "Write a headline:", "Rain again in town", "x", 0.0, 0),
             Pair("u", "b", "Title this:", "Cup glory", "y", 0.0, 0)]
    with_h = ["Past: Sun today. Storm ahead.\nWrite a headline:", "Past: Cup final.\nTitle this:"]
    got = causal_effects(lm, pairs, with_h)
    got_p = causal_effects(lm, pairs, with_h, effect="prob")

    def per_token(prompt, answer):
        q = tok(prompt)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([q + a])).logits[0].float(), -1)
        return torch.stack([logp[len(q) + j - 1, t] for j, t in enumerate(a)])

    for p, h, d, dp in zip(pairs, with_h, got, got_p):
        a, b = per_token(h, p.chosen), per_token(p.prompt, p.chosen)
        assert torch.allclose(d, a - b, atol=1e-5)
        assert torch.allclose(dp, a.exp() - b.exp(), atol=1e-6)


def test_causal_effects_are_cached_exactly_and_a_damaged_cache_is_recomputed(
        lm, tmp_path, monkeypatch, caplog) -> None:
    pairs = [Pair("u", "a", "Write a headline:", "Rain again in town", "x", 0.0, 0),
             Pair("u", "b", "Title this:", "Cup glory", "y", 0.0, 0)]
    with_h = ["Past: Sun today.\nWrite a headline:", "Past: Cup final.\nTitle this:"]
    fresh = causal_effects(lm, pairs, with_h, cache_dir=tmp_path)
    (path,) = (tmp_path / "steerx").glob("logprobs-*.json")
    real = steerx_mod.token_logprobs
    monkeypatch.setattr(steerx_mod, "token_logprobs", lambda *a, **k: pytest.fail("not cached"))
    again = causal_effects(lm, pairs, with_h, cache_dir=tmp_path)
    prob = causal_effects(lm, pairs, with_h, effect="prob", cache_dir=tmp_path)  # same passes
    assert all(torch.equal(a, b) for a, b in zip(fresh, again))
    assert all(torch.allclose(p, a.exp() - b.exp()) for p, a, b in
               zip(prob, *steerx_mod._logprob_passes(lm, with_h, [q.prompt for q in pairs],
                                                     [q.chosen for q in pairs], 8, tmp_path)))
    path.write_text('{"with": [[0.1]]')  # cut short
    monkeypatch.setattr(steerx_mod, "token_logprobs", real)
    redone = causal_effects(lm, pairs, with_h, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh, redone))
    assert "do not read back" in caplog.text and str(path) in caplog.text


def test_preference_tokens_rank_the_selected_tokens_by_summed_effect(lm) -> None:
    tok = lm.tokenizer
    pairs = [Pair("u", "a", "q", "rain rain town", "x", 0.0, 0),
             Pair("u", "b", "q", "town cup", "y", 0.0, 0), Pair("v", "c", "q", "cup", "z", 0.0, 0)]
    ids = [tok(" " + p.chosen, add_special_tokens=False)["input_ids"] for p in pairs]
    deltas = [torch.linspace(1.0, 0.1, len(i)) for i in ids]
    weights = [[1.0] * len(i) for i in ids]
    weights[1][0] = 0.0  # the first token of "town cup" is not selected
    want: dict = {}
    for p, t_ids, d, w in zip(pairs, ids, deltas, weights):  # written out again, by hand
        for t, x, keep in zip(t_ids, d.tolist(), w):
            word = tok.decode([t]).strip()
            if keep and word:
                want.setdefault(p.user, {}).setdefault(word, 0.0)
                want[p.user][word] += x
    got = preference_tokens(lm, pairs, deltas, weights, 2)
    assert set(got) == {"u", "v"} and len(got["u"]) <= 2
    for u, ws in got.items():
        best = sorted(want[u].values(), reverse=True)[:len(ws)]
        assert [want[u][w] for w in ws] == best


def test_the_description_vector_equals_a_direct_recomputation(lm, tmp_path) -> None:
    from types import SimpleNamespace

    from fints_repro.compose import compose_run
    from fints_repro.steering.hooks import capture

    cfg = compose_run(["steering=steerx", "steering.layer=1"]).steering
    pairs = [Pair("u", "a", "Write a headline:", "Rain again", "x", 0.0, 0),
             Pair("u", "b", "Title this:", "Cup glory", "y", 0.0, 0),
             Pair("w", "c", "Title:", "No words", "z", 0.0, 0)]
    inputs = SimpleNamespace(cache_dir=str(tmp_path), layers_path="", progress=False,
                             overlength="error", user_context=None, user_identity=None)
    got = steerx_mod.description_vectors(cfg, lm, pairs, {"u": "likes rain"}, 1, ["mlp"], inputs)
    assert set(got) == {"u"}  # w has no description

    def mean_act(q: str, a: str) -> torch.Tensor:
        q_ids = lm.tokenizer(q)["input_ids"]
        a_ids = lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), capture(lm.model, [(1, "mlp")]) as acts:
            lm.model(input_ids=torch.tensor([q_ids + a_ids]))
        return acts[(1, "mlp")][0, len(q_ids):].float().mean(0)

    t = cfg.steerx.description_question_template
    want = torch.stack([mean_act(t.format(question=p.prompt, description="likes rain"), p.chosen)
                        - mean_act(p.prompt, p.chosen) for p in pairs[:2]]).mean(0)
    assert torch.allclose(got["u"]["mlp"], want, atol=1e-5)
    again = steerx_mod.description_vectors(cfg, lm, pairs, {"u": "likes rain"}, 1, ["mlp"], inputs)
    assert torch.equal(again["u"]["mlp"], got["u"]["mlp"])  # read back from its cache


def test_selection_keeps_tokens_above_tau_and_falls_back_to_the_top_q() -> None:
    d = [torch.tensor([0.5, -0.2, 0.1, 0.0]), torch.tensor([-1.0, -0.5, -2.0, -0.1, -3.0])]
    assert select_tokens(d, 0.05, 0.2) == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]
    assert select_tokens(d, -math.inf, 0.2) == [[1.0] * 4, [1.0] * 5]
    assert select_tokens(d[1:], 0.0, 0.5) == [[1.0, 1.0, 0.0, 1.0, 0.0]]  # ceil(2.5) = 3


def _preds(run_dir: Path, method: str) -> list:
    return [json.loads(x)["prediction"] for x in (run_dir / method / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("override, key", [
    ("steering.steerx.token_threshold=nan", "steering.steerx.token_threshold"),
    ("steering.steerx.token_threshold=inf", "steering.steerx.token_threshold"),
    ("steering.steerx.base=lora", "steering.steerx.base"),
    ("steering.steerx.top_q=0", "steering.steerx.top_q"),
    ("steering.answer_tokenization=joint", "steering.answer_tokenization"),
    ("steering.steerx.use_description=true steering.steerx.description=false",
     "steering.steerx.use_description"),
    ("steering.steerx.description_prompt=words", "steering.steerx.description_prompt"),
    ('steering.steerx.description_question_template="x{description}"',
     "steering.steerx.description_question_template"),
    ("steering.steerx.description_tokens=0", "steering.steerx.description_tokens"),
])
def test_bad_steerx_settings_fail_at_start_naming_the_key(override, key) -> None:
    assert_config_error(["steering=steerx", *override.split()], key)


def test_token_weighted_extraction_is_the_mean_over_the_selected_answer_positions(lm) -> None:
    from fints_repro.steering.extract import answer_means
    from fints_repro.steering.hooks import capture

    q, a = ["Write a headline:", "Title:"], ["Rain again in town today", "Cup glory"]
    a_ids = [lm.tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in a]
    weights = [[1.0 if j % 2 == 0 else 0.0 for j in range(len(ids))] for ids in a_ids]
    got = answer_means(lm, q, a, 1, ["mlp"], token_weights=weights, progress=False)["mlp"]
    plain = answer_means(lm, q, a, 1, ["mlp"], progress=False)["mlp"]
    ones = answer_means(lm, q, a, 1, ["mlp"], token_weights=[[1.0] * len(x) for x in a_ids],
                        progress=False)["mlp"]
    assert torch.equal(ones, plain)  # all ones: the plain mean, bit for bit
    for i in range(2):
        q_ids = lm.tokenizer(q[i])["input_ids"]
        with torch.no_grad(), capture(lm.model, [(1, "mlp")]) as acts:
            lm.model(input_ids=torch.tensor([q_ids + a_ids[i]]))
        act = acts[(1, "mlp")][0, len(q_ids):].float()
        w = torch.tensor(weights[i])
        assert torch.allclose(got[i], (act * w[:, None]).sum(0) / w.sum(), atol=1e-5)
    with pytest.raises(Exception, match="token weights"):
        answer_means(lm, q, a, 1, ["mlp"], token_weights=[[1.0], [1.0]], progress=False)
