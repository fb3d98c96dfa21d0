"""Batched, left-padded generation equals one-at-a-time generation; sampling is seeded per
batch so that a resumed run regenerates identical text."""

from __future__ import annotations

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.generation import DecodingParams, generate_batches, plan_batches
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import load_model

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
