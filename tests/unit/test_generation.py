"""Batched, left-padded generation equals one-at-a-time generation; sampling is seeded per
batch so that a resumed run regenerates identical text; N candidates per prompt (sampled,
or the greedy output N times), with per-row steering following its rows; transformers'
static cache gives the default cache's text."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.models.chat import render_chat
from fints_repro.models.generation import DecodingParams, generate_batches, plan_batches
from fints_repro.models.loading import load_model
from fints_repro.steering.hooks import steer
from fints_repro.steering.sites import hidden_size

PROMPTS = [
    "Generate a headline for the following article: the council met on Monday.",
    "short",
    "A much longer prompt that goes on and on about a football match in the rain, "
    "with many words so that left padding is needed for the others.",
    "Medium length prompt about science.",
    "x",
]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def lm(request):
    return load_model(ModelConfig(name=f"tiny_random_{request.param}", source="tiny_random",
                                  arch=request.param, dtype="float32", device="cpu"))


def _collect(lm, texts, params, **kw):
    out = {}
    for idx, gens in generate_batches(lm, texts, params, progress=False, **kw):
        out.update(zip(idx, gens))
    return [out[i] for i in range(len(texts))]


def test_batched_left_padded_equals_one_by_one(lm) -> None:
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS]
    params = DecodingParams(max_new_tokens=8)
    batched = _collect(lm, texts, params, batch_size=4)
    alone = [_collect(lm, [t], params, batch_size=1)[0] for t in texts]
    assert batched == alone
    assert len(set(batched)) > 1  # a degenerate model would make this test vacuous


def test_batches_are_length_sorted_partition() -> None:
    batches = plan_batches([3, 9, 1, 9, 5], batch_size=2, sort_by_length=True)
    assert batches == [[1, 3], [4, 0], [2]]
    assert plan_batches([3, 9, 1], 2, sort_by_length=False) == [[0, 1], [2]]


def test_sampling_is_reproducible_and_resume_regenerates_the_same(lm) -> None:
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS]
    params = DecodingParams(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, seed=3)
    full = _collect(lm, texts, params, batch_size=2)
    again = _collect(lm, texts, params, batch_size=2)
    assert full == again
    torch.manual_seed(12345)  # global RNG state must not matter
    skip = {0, 1, 2}
    resumed = {}
    for idx, gens in generate_batches(lm, texts, params, batch_size=2, skip=skip, progress=False):
        resumed.update(zip(idx, gens))
    assert set(resumed) == {3, 4}
    assert all(resumed[i] == full[i] for i in resumed)
    other_seed = _collect(lm, texts, DecodingParams(**{**params.__dict__, "seed": 4}), batch_size=2)
    assert other_seed != full


# ---- N candidates per prompt -----------------------------------------------------------

def _collect_n(lm, texts, params, n, **kw) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for idx, gens in generate_batches(lm, texts, params, progress=False,
                                      num_return_sequences=n, **kw):
        assert len(gens) == len(idx) * n  # flat, row-major
        out.update({i: gens[j * n:(j + 1) * n] for j, i in enumerate(idx)})
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_sampled_candidates_are_reproducible_and_resumable(lm, batch_size: int) -> None:
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS]
    params = DecodingParams(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, seed=5)
    full = _collect_n(lm, texts, params, 3, batch_size=batch_size)
    assert sorted(full) == list(range(len(texts)))
    torch.manual_seed(999)  # global RNG state must not matter
    assert _collect_n(lm, texts, params, 3, batch_size=batch_size) == full
    assert any(len(set(c)) > 1 for c in full.values())  # N draws, not one copied N times
    skip = set(range(batch_size))  # the first batch (longest prompts) already done
    resumed = _collect_n(lm, texts, params, 3, batch_size=batch_size, skip=skip)
    assert set(resumed) == set(range(len(texts))) - skip
    assert all(resumed[i] == full[i] for i in resumed)


def test_greedy_candidates_are_the_greedy_output(lm) -> None:
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS]
    params = DecodingParams(max_new_tokens=8)
    single = _collect(lm, texts, params, batch_size=2)
    seen: list[list[int]] = []

    def ctx(rows):
        seen.append(rows)
        return contextlib.nullcontext()

    cands = _collect_n(lm, texts, params, 3, batch_size=2, batch_context=ctx)
    assert cands == {i: [g] * 3 for i, g in enumerate(single)}
    assert all(len(rows) == len(set(rows)) for rows in seen)  # decoded once per prompt


def test_steered_candidates_follow_their_rows(lm) -> None:
    """With N candidates the batch's generate runs B*N rows: each prompt's rows must get
    that prompt's vectors (batch_context gets each index N times in a row). Sampling with
    a tiny top_p keeps only the top token, so each candidate must equal the row steered
    alone, greedily; a vector of another row would change it."""
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS[:4]]
    g = torch.Generator().manual_seed(7)
    vecs = torch.randn(len(texts), hidden_size(lm.model), generator=g) * 4.0
    seen: list[list[int]] = []

    def ctx(rows):
        seen.append(rows)
        return steer(lm.model, {(1, "attn"): vecs[rows]})

    top = DecodingParams(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1e-6)
    cands = _collect_n(lm, texts, top, 3, batch_size=4, batch_context=ctx)
    order = plan_batches([len(lm.tokenizer(t)["input_ids"]) for t in texts], 4, True)[0]
    assert seen == [[i for i in order for _ in range(3)]]
    greedy = DecodingParams(max_new_tokens=8)
    alone = {i: _collect(lm, [texts[i]], greedy, batch_size=1,
                         batch_context=lambda rows, i=i: steer(lm.model, {(1, "attn"): vecs[[i]]}))[0]
             for i in range(len(texts))}
    assert cands == {i: [alone[i]] * 3 for i in alone}
    assert alone != dict(enumerate(_collect(lm, texts, greedy, batch_size=4)))  # steering matters
    assert len(set(alone.values())) > 1


def test_num_return_sequences_must_be_positive(lm) -> None:
    with pytest.raises(ValueError, match="num_return_sequences"):
        next(generate_batches(lm, ["x"], DecodingParams(max_new_tokens=2), num_return_sequences=0,
                              progress=False))


# ---- transformers' cache implementations ------------------------------------------------

def test_static_cache_gives_the_default_caches_text_also_steered(lm) -> None:
    texts = [render_chat(lm.tokenizer, p) for p in PROMPTS]
    params = DecodingParams(max_new_tokens=8)
    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(len(texts), hidden_size(lm.model), generator=g) * 4.0

    def ctx(rows):
        return steer(lm.model, {(1, "mlp"): vecs[rows]}, positions="generated")

    for bc in (None, ctx):
        dynamic = _collect(lm, texts, params, batch_size=3, batch_context=bc)
        static = _collect(lm, texts, params, batch_size=3, batch_context=bc,
                          cache_implementation="static")
        assert static == dynamic
    assert _collect(lm, texts, params, batch_size=3, batch_context=ctx) != _collect(
        lm, texts, params, batch_size=3)
