"""Every model input is checked against the model's context before any model time: the
test prompts (tests/unit/test_architecture.py), the pair generator's prompts and the extraction
sequences (here). ``generation.overlength=error`` stops naming the item; ``truncate`` cuts
the middle of a generator prompt's user turn, and drops question tokens from the middle
of an extraction sequence while keeping its answer whole, which is checked against an
unpadded forward pass of the cut sequence written out here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fints_repro.config import DatasetConfig, ModelConfig, PairsConfig
from fints_repro.data.demo import generate_demo_news
from fints_repro.errors import DataError
from fints_repro.models.chat import TRUNCATION_MARK, clip_token_sequence
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import Pair, build_pairs
from fints_repro.steering.extract import answer_means, pair_vectors
from fints_repro.steering.sites import SteeringError, site_module
from fints_repro.models.engines import hf as hf_engine

DATASET = DatasetConfig(
    name="demo_news", loader="demo", benchmark="demo_news", path="unused",
    question_template="Generate a headline for the following article: {input}",
    max_new_tokens=8, pair_rouge_threshold=0.15, pair_k_other=2,
)
LIMIT = 1750  # tokens (bytes of the tiny byte tokenizer): some generator prompts (1599-1821) pass it
LAYER = 1


def _lm(max_positions: int | None = None) -> LoadedModel:
    kw = {"max_position_embeddings": max_positions} if max_positions else {}
    return load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                  dtype="float32", device="cpu", arch_kwargs=kw))


@pytest.fixture(scope="module")
def samples():
    return generate_demo_news(n_users=3, n_history=3, n_test=1, seed=0)


class _Recorder:
    """Stands in for generate_batches: records the texts, answers with a fixed text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, lm, texts, params, *, skip=frozenset(), **kw):
        self.texts = list(texts)
        idx = [i for i in range(len(texts)) if i not in skip]
        yield idx, ["zebra quartz xylophone"] * len(idx)


def _pairs(lm, samples, tmp_path: Path, monkeypatch, overlength: str) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(hf_engine, "generate_batches", rec)
    build_pairs(samples, lm, DATASET, PairsConfig(attempts=1), cache_dir=tmp_path, seed=0,
                progress=False, overlength=overlength)
    return rec


def test_an_overlong_generator_prompt_stops_before_generating_naming_the_item(
        samples, tmp_path, monkeypatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("generated before checking prompt lengths")

    monkeypatch.setattr(hf_engine, "generate_batches", forbidden)
    with pytest.raises(DataError, match=r"generator prompt for item '.+' of user 'demo_user_\d+' "
                                        rf"has \d+ tokens.*context of {LIMIT}.*overlength=truncate"):
        build_pairs(samples, _lm(LIMIT), DATASET, PairsConfig(attempts=1), cache_dir=tmp_path,
                    seed=0, progress=False, overlength="error")


def test_truncate_cuts_overlong_generator_prompts_in_the_middle(samples, tmp_path, monkeypatch) -> None:
    full = _pairs(_lm(), samples, tmp_path / "full", monkeypatch, "error").texts
    small = _lm(LIMIT)
    cut = _pairs(small, samples, tmp_path / "cut", monkeypatch, "truncate").texts
    assert len(full) == len(cut)
    budget = LIMIT - DATASET.max_new_tokens
    n_cut = 0
    for f, c in zip(full, cut):
        n = len(small.tokenizer(c, add_special_tokens=False)["input_ids"])
        assert n <= budget
        if len(small.tokenizer(f, add_special_tokens=False)["input_ids"]) <= budget:
            assert c == f  # what fits is left alone
            continue
        n_cut += 1
        assert TRUNCATION_MARK in c and TRUNCATION_MARK not in f
        assert c[:60] == f[:60] and c[-60:] == f[-60:]  # the turn's start and end are kept
    assert 0 < n_cut < len(full)


def test_fit_token_sequence_drops_question_tokens_from_the_middle() -> None:
    ids, start = list(range(10)) + [100, 101, 102], 10
    assert clip_token_sequence(ids, start, 13) == (ids, start)
    assert clip_token_sequence(ids, start, None) == (ids, start)
    assert clip_token_sequence(ids, start, 8) == ([0, 1, 2, 8, 9, 100, 101, 102], 5)
    assert clip_token_sequence(ids, start, 7) == ([0, 1, 8, 9, 100, 101, 102], 4)
    assert clip_token_sequence(ids, start, 5) == ([0, 9, 100, 101, 102], 2)
    assert clip_token_sequence(ids, start, 4) == ([0, 100, 101, 102], 1)
    assert clip_token_sequence(ids, start, 3) is None  # the answer alone fills the context


@torch.no_grad()
def _reference(lm: LoadedModel, ids: list[int], start: int, site: str) -> torch.Tensor:
    got = {}

    def hook(module, args, output) -> None:
        got["a"] = (output[0] if isinstance(output, tuple) else output)[0].clone()

    h = site_module(lm.model, LAYER, site).register_forward_hook(hook)
    try:
        lm.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        h.remove()
    return got["a"][start:].mean(0)


def test_extraction_of_an_overlong_sequence_errors_or_keeps_the_answer_whole() -> None:
    limit = 48
    lm = _lm(limit)
    questions = ["Generate a headline for the following article: " + "rivers rise " * 6, "Q?"]
    answers = ["Floods close roads", "a short one"]
    with pytest.raises(SteeringError, match=rf"sequence 0 has \d+ tokens, more than the model's "
                                            rf"context of {limit}.*overlength=truncate"):
        answer_means(lm, questions, answers, LAYER, ["mlp"], progress=False)
    got = answer_means(lm, questions, answers, LAYER, ["mlp", "attn"], progress=False,
                       overlength="truncate")
    for i, (q, a) in enumerate(zip(questions, answers)):
        q_ids = lm.tokenizer(q)["input_ids"]
        a_ids = lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"]
        keep = limit - len(a_ids)
        if len(q_ids) + len(a_ids) > limit:  # written out: head and tail of the question
            assert i == 0
            q_ids = q_ids[: (keep + 1) // 2] + q_ids[len(q_ids) - keep // 2:]
        for site in ("mlp", "attn"):
            want = _reference(lm, q_ids + a_ids, len(q_ids), site)
            torch.testing.assert_close(got[site][i], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(SteeringError, match="its answer alone has"):
        answer_means(lm, ["Q?"], ["x" * (limit + 2)], LAYER, ["mlp"], progress=False,
                     overlength="truncate")


def test_pair_vectors_name_the_pair_whose_sequence_is_too_long(tmp_path) -> None:
    lm = _lm(40)
    pairs = [Pair("u1", "item-7", "Q: " + "long question " * 8, "yes", "no", 0.0, 0)]
    with pytest.raises(SteeringError, match=r"the chosen side of the pair for item 'item-7' of "
                                            r"user 'u1' has \d+ tokens"):
        pair_vectors(lm, pairs, LAYER, ["mlp"], cache_dir=tmp_path, progress=False)
    v = pair_vectors(lm, pairs, LAYER, ["mlp"], cache_dir=tmp_path, progress=False,
                     overlength="truncate")
    assert v["mlp"].shape == (1, lm.model.config.hidden_size) and torch.isfinite(v["mlp"]).all()
