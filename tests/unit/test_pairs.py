"""pairs: unit checks (the unit checks: tests.integration.test_pairs)."""

from __future__ import annotations
from dataclasses import replace
from fints_repro.config import PairsConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.preferences.pairs import build_pairs, user_history
from fints_repro.models.engines import hf as hf_engine
from tests.integration.test_pairs import AUTHORS, DATASET, FakeAuthorsGeneration, FakeGeneration, K, UNRELATED, _question, _train_items  # noqa: E402
from tests.integration.test_pairs import lm, samples  # noqa: E402,F401 (fixtures)


def test_user_history_is_a_deduplicated_union_in_first_seen_order() -> None:
    a, b, c = (HistoryItem(i, f"in {i}", f"out {i}") for i in "abc")
    samples = [Sample("s1", "u2", "x", None, (a, b)), Sample("s2", "u2", "y", None, (b, c)),
               Sample("s3", "u1", "z", None, ())]
    assert user_history(samples) == {"u1": [], "u2": [a, b, c]}
    assert list(user_history(samples)) == ["u1", "u2"]


def test_authors_layout_prompt_answer_and_question(lm, samples, tmp_path, monkeypatch) -> None:
    items = _train_items(samples)
    by_input = {h.input: (u, h) for u, hs in items.items() for h in hs}
    # per item: a print("...") answer after a thought, an answer without print(), an empty print
    kind = {h.input: j % 3 for j, h in enumerate(h for hs in items.values() for h in hs)}
    answers = {0: "<think>print('no')</think>\n```python\nprint(\"" + UNRELATED + "\")\n```",
               1: UNRELATED, 2: 'print("  ")'}
    fake = FakeAuthorsGeneration(lambda first: answers[kind[first]])
    monkeypatch.setattr(hf_engine, "generate_batches", fake)
    cfg = PairsConfig(attempts=1, prompt_layout="authors", extraction_prompt="generation_prompt",
                      max_new_tokens=1024, source="train_samples")
    out = build_pairs(samples, lm, AUTHORS, cfg, cache_dir=tmp_path, seed=0, progress=False,
                      items_by_user=items)
    assert [p.max_new_tokens for p in fake.params] == [1024]
    assert len(fake.prompts) == sum(map(len, items.values()))
    lines = {f"Historical sample {i}:\n Q: {h.input}. \n A: {h.output}.": u
             for u, hs in items.items() for h in hs for i in range(K)}
    for prompt in fake.prompts:
        first = prompt.split("\n", 1)[0]
        user, item = by_input[first]
        # the item's full input is kept as it is (it starts with "Generate")
        head = f"{item.input}\nFor your reference, here are the user's past QA pairs:\n "
        tail = "\n\nFormat the output in python code like this:\n```python\nprint(\"Your generated headline here\")\n```"
        assert prompt.startswith(head) and prompt.endswith(tail)
        shown = prompt[len(head):-len(tail)].split("\nHistorical sample ")
        shown = [shown[0]] + ["Historical sample " + x for x in shown[1:]]
        assert len(shown) == K and all(x.startswith(f"Historical sample {i}:") for i, x in enumerate(shown))
        assert all(lines.get(x) not in (None, user) for x in shown)  # other users' items, untruncated
    kept = {(p.user, p.item_id): p for ps in out.values() for p in ps}
    assert {k[1] for k in kept} == {h.id for hs in items.values() for h in hs if kind[h.input] == 0}
    for p in kept.values():
        assert p.rejected == UNRELATED
        assert p.prompt in fake.prompts and p.prompt.startswith(
            next(h.input for h in items[p.user] if h.id == p.item_id))
    # extraction_prompt=task: the item's task input, not doubled
    task = build_pairs(samples, lm, AUTHORS, replace(cfg, extraction_prompt="task"), cache_dir=tmp_path,
                       seed=0, progress=False, items_by_user=items)
    assert all(p.prompt == next(h.input for h in items[p.user] if h.id == p.item_id)
               for ps in task.values() for p in ps)


def test_items_by_user_are_the_items_pairs_come_from(lm, samples, tmp_path, monkeypatch) -> None:
    fake = FakeGeneration(samples, lambda u, h: UNRELATED)
    monkeypatch.setattr(hf_engine, "generate_batches", fake)
    profile = user_history(samples)
    # One item per sample user, and an extra user (not among the samples) whose items
    # only ever appear as the "other users'" items.
    items = {u: hs[:1] for u, hs in profile.items()}
    extra = next(h for hs in profile.values() for h in hs[1:])
    items["zz-extra"] = [HistoryItem("extra", extra.input, extra.output)]
    out = build_pairs(samples, lm, DATASET, PairsConfig(attempts=3), cache_dir=tmp_path, seed=0,
                      progress=False, items_by_user=items)
    assert sorted(out) == sorted(profile)  # pairs for the samples' users only
    assert {(u, p.item_id) for u, ps in out.items() for p in ps} == {(u, hs[0].id) for u, hs in profile.items()}
    assert 0 < len(fake.generated) <= 3 * len(profile)  # identical prompts are generated once
    assert any(f"A: {extra.output}." in t for t in fake.generated)
    # compact layout: a full task input is not prefixed twice
    full = {u: [HistoryItem(h.id, _question(h), h.output) for h in hs] for u, hs in items.items()}
    fake.generated.clear()
    build_pairs(samples, lm, DATASET, PairsConfig(attempts=3), cache_dir=tmp_path / "full",
                seed=0, progress=False, items_by_user=full)
    assert not any(_question(HistoryItem("", _question(h), "")) in t
                   for t in fake.generated for hs in full.values() for h in hs)
