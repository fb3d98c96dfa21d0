"""Contrastive pairs: the generator prompt holds k items of other users and the task
question, seeded per attempt; the ROUGE-L filter keeps exactly the attempts below the
threshold; generations are cached per prompt, so a rerun generates nothing and a
truncated cache regenerates only what is missing."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest
from rouge_score import rouge_scorer

import fints_repro.preferences.pairs as pairs_mod
from fints_repro.config import DatasetConfig, ModelConfig, PairsConfig
from fints_repro.data.demo import generate_demo_news
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import build_pairs, pair_stats, user_history
from fints_repro.models.engines import hf as hf_engine

K = 2
DATASET = DatasetConfig(
    name="demo_news", loader="demo", benchmark="demo_news", path="unused",
    question_template="Generate a headline for the following article: {input}",
    max_new_tokens=8, pair_rouge_threshold=0.15, pair_k_other=K,
)
UNRELATED = "zebra quartz xylophone"


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                  dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return generate_demo_news(n_users=3, n_history=3, n_test=1, seed=0)


def _question(item: HistoryItem) -> str:
    return DATASET.question_template.format(input=item.input)


def _item_of(text: str, samples: list[Sample]) -> tuple[str, HistoryItem]:
    """(user, item) whose task question ends the generator prompt inside ``text``."""
    hits = [(s.user, h) for s in samples for h in s.history
            if f"\n\n{_question(h)}<|im_end|>" in text]
    assert len(hits) == 1, "each prompt ends with exactly one item's task question"
    return hits[0]


class FakeGeneration:
    """Stands in for ``generate_batches``: answers each prompt with ``answer(user, item)``
    and records the texts it was asked to generate."""

    def __init__(self, samples: list[Sample], answer: Callable[[str, HistoryItem], str]):
        self.samples, self.answer = samples, answer
        self.generated: list[str] = []

    def __call__(
        self, lm, texts, params, *, skip=frozenset(), **kw
    ) -> Iterator[tuple[list[int], list[str]]]:
        idx = [i for i in range(len(texts)) if i not in skip]
        self.generated += [texts[i] for i in idx]
        yield idx, [self.answer(*_item_of(texts[i], self.samples)) for i in idx]


def _run(lm, samples, tmp_path: Path, cfg: PairsConfig | None = None, seed: int = 0):
    return build_pairs(samples, lm, DATASET, cfg or PairsConfig(attempts=1),
                       cache_dir=tmp_path, seed=seed, progress=False)


def test_prompt_holds_k_items_of_other_users_then_the_task_question(
    lm, samples, tmp_path, monkeypatch
) -> None:
    fake = FakeGeneration(samples, lambda u, h: UNRELATED)
    monkeypatch.setattr(hf_engine, "generate_batches", fake)
    _run(lm, samples, tmp_path / "a")
    n_items = sum(len(s.history) for s in samples)
    assert len(fake.generated) == n_items
    line = "Historical sample {}:\n Q: {}. \n A: {}."
    for text in fake.generated:
        user, item = _item_of(text, samples)
        assert text.count("Historical sample ") == K
        own = other = 0
        for s in samples:
            for h in s.history:
                n = sum(text.count(line.format(i, _question(h), h.output)) for i in range(K))
                own += n if s.user == user else 0
                other += n if s.user != user else 0
        assert own == 0 and other == K
        assert text.index(_question(item)) > text.rindex("Historical sample ")

    again = FakeGeneration(samples, lambda u, h: UNRELATED)
    monkeypatch.setattr(hf_engine, "generate_batches", again)
    _run(lm, samples, tmp_path / "b")
    assert again.generated == fake.generated  # same seed, same prompts (fresh cache)
    other_seed = FakeGeneration(samples, lambda u, h: UNRELATED)
    monkeypatch.setattr(hf_engine, "generate_batches", other_seed)
    _run(lm, samples, tmp_path / "c", seed=1)
    assert sorted(other_seed.generated) != sorted(fake.generated)


def test_threshold_filter_keeps_exactly_the_dissimilar_non_empty_attempts(
    lm, samples, tmp_path, monkeypatch
) -> None:
    items = [h for s in samples for h in s.history]
    # Per item: its own output (ROUGE-L 1, dropped), an unrelated string (0, kept), a near
    # miss sharing words with the output, or only whitespace (dropped: empty).
    answers = {}
    for j, h in enumerate(items):
        answers[h.id] = [h.output, f"  {UNRELATED}\n", " ".join(h.output.split()[:3]) + " " + UNRELATED,
                         " \n "][j % 4]
    monkeypatch.setattr(hf_engine, "generate_batches", FakeGeneration(samples, lambda u, h: answers[h.id]))
    out = _run(lm, samples, tmp_path)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = {}
    for s in samples:
        expected[s.user] = []
        for h in s.history:
            rejected = answers[h.id].strip()
            f = scorer.score(h.output, rejected)["rougeL"].fmeasure if rejected else None
            if f is not None and f < DATASET.pair_rouge_threshold:
                expected[s.user].append((h.id, rejected, f))
    assert {u: [(p.item_id, p.rejected, p.score) for p in ps] for u, ps in out.items()} == expected
    kept = [item_id for ps in expected.values() for item_id, *_ in ps]
    assert kept == [h.id for j, h in enumerate(items) if j % 4 == 1]  # the near misses score >= 0.15
    assert all(p.chosen == next(h.output for h in items if h.id == p.item_id)
               for ps in out.values() for p in ps)
    stats = pair_stats(out)
    assert stats["n_users"] == 3 and stats["n_pairs"] == len(kept)
    assert stats["mean_score"] == 0.0


def test_every_passing_attempt_is_kept_in_history_then_attempt_order(
    lm, samples, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(hf_engine, "generate_batches", FakeGeneration(samples, lambda u, h: UNRELATED))
    out = _run(lm, samples, tmp_path, PairsConfig(attempts=2))
    for s in samples:
        assert [(p.item_id, p.attempt) for p in out[s.user]] == [
            (h.id, a) for h in s.history for a in (0, 1)]


def test_question_modes(lm, samples, tmp_path, monkeypatch) -> None:
    fake = FakeGeneration(samples, lambda u, h: UNRELATED)
    monkeypatch.setattr(hf_engine, "generate_batches", fake)
    items = {h.id: h for s in samples for h in s.history}
    task = _run(lm, samples, tmp_path, PairsConfig(attempts=1, extraction_prompt="task"))
    assert all(p.prompt == _question(items[p.item_id]) for ps in task.values() for p in ps)

    full = _run(lm, samples, tmp_path, PairsConfig(attempts=1, extraction_prompt="generation_prompt"))
    for ps in full.values():
        for p in ps:
            assert p.prompt.startswith("Historical sample 0:\n Q: ")
            assert p.prompt.endswith("\n\n" + _question(items[p.item_id]))
            assert p.prompt.count("Historical sample ") == K
    assert sum(map(len, full.values())) == len(items)
    with pytest.raises(ConfigError, match="steering.pairs.extraction_prompt"):
        _run(lm, samples, tmp_path, PairsConfig(extraction_prompt="article"))


def test_cache_reuses_every_generation_and_resumes_a_truncated_run(
    lm, samples, tmp_path, monkeypatch
) -> None:
    generated: list[int] = []
    real = hf_engine.generate_batches

    def counting(*args, **kw):
        for idx, gens in real(*args, **kw):
            generated.extend(idx)
            yield idx, gens

    monkeypatch.setattr(hf_engine, "generate_batches", counting)
    cfg = PairsConfig(attempts=2, batch_size=4)
    first = _run(lm, samples, tmp_path, cfg)
    n_prompts = len(generated)
    assert n_prompts == 2 * sum(len(s.history) for s in samples)
    assert pair_stats(first)["n_pairs"] > 0  # random text is far from the headlines

    generated.clear()
    assert _run(lm, samples, tmp_path, cfg) == first
    assert generated == []

    (store,) = (tmp_path / "pairs").glob("*.jsonl")
    lines = store.read_text().splitlines(keepends=True)
    store.write_text("".join(lines[: len(lines) // 2]))
    assert _run(lm, samples, tmp_path, cfg) == first
    assert len(generated) == n_prompts - len(lines) // 2

    generated.clear()
    _run(lm, samples, tmp_path, replace(cfg, batch_size=3))  # another batching, another store
    assert len(generated) == n_prompts


def test_a_single_user_gets_no_pairs_and_no_crash(lm, samples, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=pairs_mod.__name__):
        out = _run(lm, samples[:1], tmp_path)
    assert out == {samples[0].user: []}
    assert "no other user has history" in caplog.text
    assert pair_stats(out) == {"n_users": 1, "n_pairs": 0, "n_users_without_pairs": 1,
                               "mean_score": None}


# --- The authors' layout, the items pairs are made from, the ROUGE implementation --------

AUTHORS = replace(
    DATASET,
    authors_question_template="Generate a headline for the following article: {input}",
    authors_keep_prefix="Generate",
    pair_prompt_template="{input}\nFor your reference, here are the user's past QA pairs:\n {history}\n"
                         "\nFormat the output in python code like this:\n```python\n"
                         "print(\"Your generated headline here\")\n```",
)


def _train_items(samples: list[Sample]) -> dict[str, list[HistoryItem]]:
    """Training-split-like items: full task inputs (as a LaMP-4 training sample has them)."""
    return {u: [HistoryItem(f"t-{h.id}", _question(h), h.output) for h in items]
            for u, items in user_history(samples).items()}


def _user_turn(text: str) -> str:
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


class FakeAuthorsGeneration:
    """Answers each authors-layout prompt with ``answer(item)`` (item = the prompt's first
    line, its task input) and records the prompts and the decoding parameters."""

    def __init__(self, answer: Callable[[str], str]):
        self.answer, self.prompts, self.params = answer, [], []

    def __call__(self, lm, texts, params, *, skip=frozenset(), **kw):
        idx = [i for i in range(len(texts)) if i not in skip]
        self.params.append(params)
        self.prompts += [_user_turn(texts[i]) for i in idx]
        yield idx, [self.answer(_user_turn(texts[i]).split("\n", 1)[0]) for i in idx]


def test_rouge_impl_decides_which_attempts_are_kept(lm, samples, tmp_path, monkeypatch) -> None:
    from rouge import Rouge

    # Same words, other case: rouge_score (lowercased tokens) scores 1, the `rouge`
    # package (case-sensitive words) scores the words whose case changed only.
    monkeypatch.setattr(hf_engine, "generate_batches",
                        FakeGeneration(samples, lambda u, h: h.output.upper()))
    score = _run(lm, samples, tmp_path, PairsConfig(attempts=1))
    pkg = _run(lm, samples, tmp_path, PairsConfig(attempts=1, rouge_impl="rouge"))
    assert pair_stats(score)["n_pairs"] == 0
    want = {}
    for h in (h for hs in user_history(samples).values() for h in hs):
        f = Rouge().get_scores(h.output.upper(), h.output)[0]["rouge-l"]["f"]
        if f < DATASET.pair_rouge_threshold:
            want[h.id] = f
    assert len(want) >= 5
    assert {p.item_id: p.score for ps in pkg.values() for p in ps} == want


@pytest.mark.parametrize("cfg, match", [
    (PairsConfig(prompt_layout="theirs"), "prompt_layout"),
    (PairsConfig(rouge_impl="rouge2"), "rouge_impl"),
    (PairsConfig(source="test"), "source"),
    (PairsConfig(source="train_samples"), "training-split"),
    (PairsConfig(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_pair_options_fail_before_any_generation(lm, samples, tmp_path, cfg, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _run(lm, samples, tmp_path, cfg)
    assert not (tmp_path / "pairs").exists()
