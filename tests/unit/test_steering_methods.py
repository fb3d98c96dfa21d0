"""Steering methods against explicit recomputations written here.

Pairs are built by hand (``build_pairs`` is replaced), so every expected vector is known:

- ``caa``: per sample, strength x the mean of its user's pair vectors; no pairs = an exact
  zero row, unsteered;
- ``fine_grained``: per sample, the top-K of its user's pairs by BM25 on the retrieval
  query against ``question + chosen``, weighted 1/K or softmax(score / tau), times the
  site's strength; K beyond a user's pairs is clipped, logged and counted;
- a bad config fails before any pair is built;
- a plan's batch context steers exactly like ``steer`` with the plan's rows; row digests
  tell different rows apart;
- end to end: a lone user (no pairs) generates exactly like the unsteered backbone;
  with pairs, predictions carry the selected pairs and strong steering changes the output.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import fints_repro.preferences.pairs as pairs_mod
from fints_repro.config import (
    DatasetConfig,
    EvalConfig,
    GenerationConfig,
    ModelConfig,
)
from fints_repro.data.schema import Sample
from fints_repro.errors import FintsError
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import Pair
from fints_repro.retrieval.bm25 import BM25Retriever
from fints_repro.steering import SteeringInputs, SteeringPlan, steering_schema
from fints_repro.steering.extract import answer_means
from fints_repro.steering.hooks import steer
from fints_repro.steering.methods.caa import CAASettings, caa
from fints_repro.steering.methods.fine_grained import FineGrainedSettings, fine_grained
from fints_repro.steering.sites import hidden_size
from fints_repro.tasks import build_task

# the steering config as a run composes it: the shared fields and every method's node
SteeringConfig = steering_schema()

PREFIX = "Generate a headline for the following article: "
DATASET = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path="unused",
                        question_template=PREFIX + "{input}", query_strip_prefix=PREFIX,
                        max_new_tokens=8)
TASK = build_task(DATASET, GenerationConfig(), EvalConfig())
LAYER = 1

# u1: 3 pairs, u2: 6 pairs, u3: none. The inputs share words with some pairs and not with
# the first ones, so retrieval reorders.
_TOPICS = {
    "u1": [("the weather today was mild and sunny", "Mild sunny day", "bread recipe"),
           ("a new library opened downtown", "Library opens", "cats sleep a lot"),
           ("the mayor spoke about river floods", "Mayor warns of floods", "green tea")],
    "u2": [("the football team won the cup final", "Team wins cup", "violin lessons"),
           ("elections were held and the vote was close", "Close vote", "mountain hike"),
           ("heavy rain caused floods along the river", "River floods town", "jazz night"),
           ("stocks fell as the bank reported losses", "Bank stocks fall", "garden tips"),
           ("markets rallied after the bank decision", "Markets rally on bank", "tax forms"),
           ("the river level rose after rain and floods", "Floods rise again", "old cars")],
}
PAIRS = {u: [Pair(u, f"{u}-h{j}", PREFIX + inp, chosen, rejected, 0.0, j % 2)
             for j, (inp, chosen, rejected) in enumerate(items)] for u, items in _TOPICS.items()}
PAIRS["u3"] = []
SAMPLES = [
    Sample("s1", "u1", PREFIX + "floods near the river worried the mayor", "t"),
    Sample("s2", "u2", PREFIX + "rain and floods hit the river city", "t"),
    Sample("s3", "u3", PREFIX + "anything at all", "t"),
    Sample("s4", "u2", PREFIX + "the bank and stocks markets", "t"),
    Sample("s5", "u1", PREFIX + "sunny weather for the library opening", "t"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                  dtype="float32", device="cpu"))


class FakeBuildPairs:
    def __init__(self, pairs=PAIRS):
        self.pairs, self.calls = pairs, 0

    def __call__(self, samples, lm, dataset, cfg, *, cache_dir, seed, progress=True,
                 items_by_user=None, task=None, overlength="error", pool=()):
        self.calls += 1
        assert {s.user for s in samples} <= set(self.pairs)
        return {u: list(ps) for u, ps in self.pairs.items()}


@pytest.fixture
def fake_pairs(monkeypatch) -> FakeBuildPairs:
    fake = FakeBuildPairs()
    monkeypatch.setattr(pairs_mod, "build_pairs", fake)
    return fake


def _inputs(lm, tmp_path: Path, generated: list | None = None) -> SteeringInputs:
    def generator():
        if generated is not None:
            generated.append(1)
        return lm

    return SteeringInputs(dataset=DATASET, task=TASK, cache_dir=str(tmp_path), seed=0,
                          retriever=BM25Retriever, generator=generator, progress=False)


def _user_vectors(lm, user: str, layer: int, sites: list[str], **kw) -> dict[str, torch.Tensor]:
    """The user's pair vectors, recomputed: answer-token means of chosen minus rejected."""
    ps = PAIRS[user]
    qs = [p.prompt for p in ps]
    c = answer_means(lm, qs, [p.chosen for p in ps], layer, sites, batch_size=4, progress=False, **kw)
    r = answer_means(lm, qs, [p.rejected for p in ps], layer, sites, batch_size=4, progress=False, **kw)
    return {s: c[s] - r[s] for s in sites}


def test_the_methods_extract_with_the_configured_reads(lm, fake_pairs, tmp_path) -> None:
    """attn_read and answer_tokenization reach the extraction (fidelity=authors sets both)."""
    sites = ["attn", "mlp"]
    cfg = SteeringConfig(name="caa", layer=LAYER, sites=sites, attn_read="residual",
                         answer_tokenization="joint")
    plan = caa(cfg, lm, SAMPLES, _inputs(lm, tmp_path))
    want = _user_vectors(lm, "u1", LAYER, sites, attn_read="residual", answer_tokenization="joint")
    plain = _user_vectors(lm, "u1", LAYER, sites)
    for site in sites:
        torch.testing.assert_close(plan.vectors[(LAYER, site)][0], want[site].mean(0),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want[site].mean(0), plain[site].mean(0), atol=1e-4)


STRENGTH = dict(alpha=0.7, beta=-1.3, gamma=2.0)
SITE_STRENGTH = {"attn": 0.7, "mlp": -1.3, "resid": 2.0}


@pytest.mark.parametrize("sites", [["attn", "mlp"], ["resid"]])
def test_caa_is_strength_times_the_users_mean_pair_vector(lm, fake_pairs, tmp_path, sites) -> None:
    cfg = SteeringConfig(name="caa", layer=LAYER, sites=sites, **STRENGTH)
    plan = caa(cfg, lm, SAMPLES, _inputs(lm, tmp_path))
    assert fake_pairs.calls == 1
    assert set(plan.vectors) == {(LAYER, s) for s in sites}
    H = hidden_size(lm.model)
    per_user = {u: _user_vectors(lm, u, LAYER, sites) for u in ("u1", "u2")}
    for i, s in enumerate(SAMPLES):
        for site in sites:
            got = plan.vectors[(LAYER, site)][i]
            assert got.shape == (H,) and got.dtype == torch.float32
            if s.user == "u3":
                assert torch.equal(got, torch.zeros(H))
            else:
                want = SITE_STRENGTH[site] * per_user[s.user][site].mean(0)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    site = sites[0]
    assert (plan.vectors[(LAYER, site)][0] - plan.vectors[(LAYER, site)][1]).abs().max() > 1e-3
    assert plan.steered == [True, True, False, True, True]
    assert plan.stats == {"layer": LAYER, "n_pairs": 9, "n_users_with_pairs": 2,
                          "n_samples_steered": 4, "n_samples_unsteered": 1,
                          # the fake pairs are a plain dict: no attempts recorded
                          "pair_attempts": 0, "pair_attempts_per_user": {}, "pair_outcomes": {},
                          "pairs_per_user": {"u1": 3, "u2": 6, "u3": 0}}
    assert [r["n_pairs"] for r in plan.row_info] == [3, 6, 0, 6, 3]
    assert plan.positions == "all"


def _softmax(scores: list[float], tau: float) -> list[float]:
    m = max(scores)
    e = [math.exp((x - m) / tau) for x in scores]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("top_k,aggregate,tau", [(2, "mean", 0.1), (2, "softmax", 0.5),
                                                  (4, "mean", 0.1), (4, "softmax", 1.5)])
def test_fine_grained_is_strength_times_weighted_top_k(lm, fake_pairs, tmp_path, caplog,
                                                       top_k, aggregate, tau) -> None:
    sites = ["attn", "mlp"]
    cfg = SteeringConfig(name="fine_grained", layer=LAYER, sites=sites, **STRENGTH,
                         fine_grained=FineGrainedSettings(top_k=top_k, aggregate=aggregate, temperature=tau))
    with caplog.at_level(logging.WARNING):
        plan = fine_grained(cfg, lm, SAMPLES, _inputs(lm, tmp_path))
    per_user = {u: _user_vectors(lm, u, LAYER, sites) for u in ("u1", "u2")}
    H = hidden_size(lm.model)
    reordered = unequal = 0
    for i, s in enumerate(SAMPLES):
        if s.user == "u3":
            for site in sites:
                assert torch.equal(plan.vectors[(LAYER, site)][i], torch.zeros(H))
            assert plan.steered[i] is False and plan.row_info[i] == {"pairs": [], "weights": []}
            continue
        ps = PAIRS[s.user]
        query = TASK.retrieval_query(s)
        assert not query.startswith("Generate")
        ((ranking),) = BM25Retriever().rank_many([query], [[f"{p.prompt} {p.chosen}" for p in ps]],
                                                 top_k)
        picked = [j for j, _ in ranking]
        assert len(picked) == min(top_k, len(ps))
        reordered += picked != list(range(len(picked)))
        scores = [sc for _, sc in ranking]
        w = [1 / len(picked)] * len(picked) if aggregate == "mean" else _softmax(scores, tau)
        unequal += max(w) - min(w) > 1e-3
        for site in sites:
            want = SITE_STRENGTH[site] * sum(wj * per_user[s.user][site][j] for wj, j in zip(w, picked))
            torch.testing.assert_close(plan.vectors[(LAYER, site)][i], want, rtol=1e-5, atol=1e-5)
        assert plan.row_info[i]["pairs"] == [f"{ps[j].item_id}#{ps[j].attempt}" for j in picked]
        assert plan.row_info[i]["weights"] == pytest.approx(w, abs=1e-6)
        assert plan.steered[i] is True
    assert reordered >= 2  # retrieval, not history order, picks the pairs
    if aggregate == "softmax":
        assert unequal >= 2
    clipped = sum(1 for s in SAMPLES if PAIRS[s.user] and len(PAIRS[s.user]) < top_k)
    assert clipped == (2 if top_k == 4 else 0)
    assert plan.stats["n_samples_k_clipped"] == clipped
    assert plan.stats["n_samples_steered"] == 4 and plan.stats["n_samples_unsteered"] == 1
    warned = [r for r in caplog.records if "top_k" in r.getMessage()]
    assert len(warned) == (1 if clipped else 0)
    if clipped:
        assert warned[0].levelno == logging.WARNING
        assert f"for {clipped} of 4 samples" in warned[0].getMessage()


def test_fine_grained_with_k_one_and_a_single_pair_user_differ(lm, fake_pairs, tmp_path) -> None:
    """Different inputs of one user get different vectors (instance-level, not user-level)."""
    cfg = SteeringConfig(name="fine_grained", layer=LAYER, fine_grained=FineGrainedSettings(top_k=1))
    plan = fine_grained(cfg, lm, SAMPLES, _inputs(lm, tmp_path))
    a = plan.vectors[(LAYER, "attn")]
    assert plan.row_info[1]["pairs"] != plan.row_info[3]["pairs"]
    assert (a[1] - a[3]).abs().max() > 1e-3
    per_user = _user_vectors(lm, "u2", LAYER, ["attn"])
    j = [p.item_id for p in PAIRS["u2"]].index(plan.row_info[1]["pairs"][0].split("#")[0])
    torch.testing.assert_close(a[1], per_user["attn"][j], rtol=1e-5, atol=1e-5)
    assert plan.row_info[1]["weights"] == [1.0]


BAD = [
    (dict(layer=4), "outside the model"),
    (dict(layer=-1), "outside the model"),
    (dict(sites=["attn", "ffn"]), "unknown site"),
    (dict(sites=[]), "empty"),
    (dict(fine_grained=FineGrainedSettings(top_k=0)), "steering.fine_grained.top_k"),
    (dict(fine_grained=FineGrainedSettings(aggregate="max")), "steering.fine_grained.aggregate"),
    (dict(fine_grained=FineGrainedSettings(temperature=0.0)), "steering.fine_grained.temperature"),
    (dict(caa=CAASettings(min_pairs=0)), "steering.caa.min_pairs"),
    (dict(positions="middle"), "positions"),
    (dict(attn_read="foo"), "attn_read"),
    (dict(alpha=float("nan")), "alpha"),
]


@pytest.mark.parametrize("method", [caa, fine_grained])
@pytest.mark.parametrize("change,match", BAD)
def test_bad_config_fails_before_any_pair_is_built(lm, fake_pairs, tmp_path, method, change,
                                                   match) -> None:
    generated: list = []
    cfg = SteeringConfig(name=method.__name__, **{"layer": LAYER, **change})
    with pytest.raises(FintsError, match=match):
        method(cfg, lm, SAMPLES, _inputs(lm, tmp_path, generated))
    assert fake_pairs.calls == 0 and generated == []
    assert not (tmp_path / "vectors").exists()


def test_default_layer_is_two_thirds_of_the_depth(lm, fake_pairs, tmp_path) -> None:
    plan = caa(SteeringConfig(name="caa"), lm, SAMPLES, _inputs(lm, tmp_path))
    assert plan.stats["layer"] == 3 and set(plan.vectors) == {(3, "attn"), (3, "mlp")}


def _plan(H: int, positions: str = "all") -> SteeringPlan:
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(5, H, generator=g) * 3
    mlp = torch.randn(5, H, generator=g) * 3
    attn[4], mlp[4] = attn[1], mlp[1]  # rows 1 and 4 identical
    attn[3], mlp[3] = 0.0, 0.0  # row 3 unsteered
    return SteeringPlan({(LAYER, "attn"): attn, (2, "mlp"): mlp}, [True, True, True, False, True],
                        positions)


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_batch_context_steers_like_steer_with_the_plans_rows(lm, positions) -> None:
    model, tok = lm.model, lm.tokenizer
    plan = _plan(hidden_size(model), positions)
    enc = tok(["a short one", "a somewhat longer prompt here", "mid prompt"], return_tensors="pt",
              padding=True)
    rows = [2, 0, 3]
    with torch.no_grad():
        with plan.batch_context(model)(rows):
            got = model(**enc).logits
        with steer(model, {k: v[rows] for k, v in plan.vectors.items()}, positions):
            want = model(**enc).logits
        with steer(model, {k: v[[0, 2, 3]] for k, v in plan.vectors.items()}, positions):
            other_rows = model(**enc).logits
        plain = model(**enc).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got[:2], other_rows[:2])
    assert torch.equal(got[2], plain[2])  # row 3 of the plan is zero
    assert not torch.allclose(got[0], plain[0])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_row_digests_tell_rows_apart() -> None:
    H = 64
    plan = _plan(H)
    d = plan.row_digests()
    assert len(d) == 5 and all(isinstance(x, str) for x in d)
    # an unsteered row shares the plain generation's cache key; steered rows do not
    assert [x == "" for x in d] == [not s for s in plan.steered]
    assert d[1] == d[4]
    assert len({d[0], d[1], d[2], d[3]}) == 4
    assert _plan(H).row_digests() == d
    assert _plan(H, "prompt").row_digests()[0] != d[0]
    nudged = _plan(H)
    nudged.vectors[(2, "mlp")][2, 7] += 1e-4
    d2 = nudged.row_digests()
    assert d2[2] != d[2] and d2[:2] == d[:2] and d2[3:] == d[3:]


# ---------------------------------------------------------------- end to end, tiny model


def _run(overrides: list[str], run_dir: Path):
    from fints_repro.compose import compose_run
    from fints_repro.pipeline import run_experiment

    cfg = compose_run(overrides)
    return cfg, run_experiment(cfg, run_dir, overrides)


def _predictions(run_dir: Path, method: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / method / "predictions.jsonl").read_text().splitlines()]


# Byte-level tokens: keep the prompts short (RAG and pair prompts cut inputs to this many words).
SHORT = ["backbone.k=2", "dataset.history_max_words=8", "dataset.pair_k_other=1",
         "steering.pairs.attempts=1"]


def _without_n_users(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("dataset.demo.n_users=")]


