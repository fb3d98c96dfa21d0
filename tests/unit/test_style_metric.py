"""The style demo's data, its style metric (against hand-scored predictions) and the NLL its
fluency guard reads (against the model's own loss)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fints_repro.data.demo_style import KINDS, generate_demo_style, sample_type
from fints_repro.eval import compute_metrics
from fints_repro.eval.style import has_style, is_casual, is_degenerate, is_positive

# (prediction, preference, nll) -> hand scores (style, casual, positive, fluent), limit 4.0
HAND_SCORED = [
    ("Whoa, the Rangers won again!", "casual", 2.0, (1, 1, 1, 1)),  # "!", "won"
    ("Rangers win title in Westmoor", "casual", 2.0, (0, 0, 1, 1)),
    ("Council approves budget in Oakridge", "formal", 2.0, (1, 0, 0, 1)),
    ("Council approves budget, and it\u2019s big", "formal", 2.0, (0, 1, 0, 1)),  # curly it's
    ("Great news as Council approves budget", "positive", 2.0, (1, 0, 1, 1)),
    ("Great news despite budget crisis", "positive", 2.0, (0, 0, 0, 1)),  # a negative word
    ("Guess what happened in Oakridge today", "casual", 2.0, (1, 1, 0, 1)),  # a phrase
    ("wow wow wow wow Oakridge", "casual", 2.0, (0, 0, 0, 0)),  # a word 4 times
    ("the the", "formal", 2.0, (0, 0, 0, 0)),  # fewer than 3 distinct words
    ("Council approves budget in Oakridge", "formal", 4.5, (0, 0, 0, 0)),  # NLL above 4.0
    ("Council approves budget in Oakridge", "formal", None, (0, 0, 0, 0)),  # no NLL: not fluent
]


def test_style_metric_equals_hand_scores() -> None:
    preds = [p for p, _, _, _ in HAND_SCORED]
    agg, rows = compute_metrics(["style"], preds, ["ref"] * len(preds),
                                preferences=[p for _, p, _, _ in HAND_SCORED],
                                values={"nll": [v for _, _, v, _ in HAND_SCORED]}, max_nll=4.0)
    for row, (pred, _, _, want) in zip(rows, HAND_SCORED):
        assert (row["style"], row["casual"], row["positive"], row["fluent"]) == want, pred
    assert agg["style"] == pytest.approx(4 / 11)
    assert agg["fluent"] == pytest.approx(7 / 11)
    assert agg["nll"] == pytest.approx((2.0 * 9 + 4.5) / 10)


def test_without_a_limit_the_nll_is_not_read_and_preferences_are_required() -> None:
    _, rows = compute_metrics(["style"], ["Council approves budget in Oakridge"], ["r"],
                              preferences=["formal"])
    assert rows[0]["fluent"] == 1.0
    with pytest.raises(ValueError, match="preference"):
        compute_metrics(["style"], ["a b c"], ["r"])
    with pytest.raises(ValueError, match="NLL"):
        compute_metrics(["style"], ["a b c"], ["r"], preferences=["formal"], max_nll=4.0)


def test_lexicon_rules() -> None:
    assert is_casual("That's wild") and is_casual("No way they did it")
    assert not is_casual("Novalink's chief resigns")  # a possessive is not a contraction
    assert is_positive("A historic win for Oakridge") and not is_positive("A historic crisis")
    assert is_degenerate("") and is_degenerate("go go") and not is_degenerate("go go go team now")
    assert is_degenerate("go team go go go")  # one word 4 times
    assert is_degenerate("Carver, it's just a reality, it's just a reality")  # a trigram twice
    assert not is_degenerate("Council backs plan as council backs down on tax")
    with pytest.raises(ValueError, match="unknown preference"):
        has_style("a b c", "sarcastic")


def test_demo_style_users_write_their_preference_and_topic_users_split_by_topic() -> None:
    users = {"casual": 2, "formal": 2, "positive": 2, "topic": 3}
    samples = generate_demo_style(users=users, n_history=10, n_test=4, seed=3)
    assert Counter(s.user for s in samples) == {f"style_{k}_{u:02d}": 4
                                                for k, n in users.items() for u in range(n)}
    for s in samples:
        kind = s.meta["kind"]
        for text, meta in [(s.target, s.meta), *((h.output, h.meta) for h in s.history)]:
            topics, pref_of = KINDS[kind]
            assert meta["preference"] == pref_of.get(meta["topic"], pref_of.get("*"))
            assert has_style(text, meta["preference"]) and not is_degenerate(text), text
        assert s.type == sample_type(kind, s.meta["preference"])
        if kind == "topic":  # half and half, history and test alike
            assert Counter(h.meta["topic"] for h in s.history) == {"sports": 5, "politics": 5}
    topic = [s for s in samples if s.meta["kind"] == "topic"]
    assert Counter(s.meta["topic"] for s in topic) == {"sports": 6, "politics": 6}
    # the same arguments give the same data; more users of one kind leave the others as they were
    again = generate_demo_style(users={**users, "casual": 3}, n_history=10, n_test=4, seed=3)
    same = {s.id: s.target for s in again}
    assert all(same[s.id] == s.target for s in samples)


def test_the_loader_gives_meta_and_types_from_the_written_files(tmp_path) -> None:
    from fints_repro.compose import compose_run
    from fints_repro.data.load import load_samples

    cfg = compose_run(["dataset=demo_style", f"cache_dir={tmp_path}",
                       "dataset.demo_style.users.casual=1", "dataset.demo_style.users.formal=0",
                       "dataset.demo_style.users.positive=0", "dataset.demo_style.users.topic=1", "dataset.demo_style.n_test=4"])
    loaded = load_samples(cfg.dataset, seed=0)
    made = generate_demo_style(users={"casual": 1, "topic": 1},
                               n_history=cfg.dataset.demo_style.n_history, n_test=4, seed=0)
    assert [(s.id, s.target, s.type, s.meta["preference"], s.meta["topic"]) for s in loaded] == \
        [(s.id, s.target, s.type, s.meta["preference"], s.meta["topic"]) for s in made]


def test_mean_token_nll_equals_the_models_own_loss_on_the_answer(tmp_path) -> None:
    from fints_repro.compose import compose_run
    from fints_repro.models.loading import load_model
    from fints_repro.steering.logprob import mean_token_nll

    lm = load_model(compose_run(["model=tiny_random_llama", f"cache_dir={tmp_path}"]).model,
                    str(tmp_path))
    prompts = ["Headline for: the council met.", "Headline for: a long article about a game"]
    answers = ["Council meets!", "Rangers win"]
    got = mean_token_nll(lm, prompts, answers, batch_size=2)
    for p, a, g in zip(prompts, answers, got):
        q = lm.tokenizer(p)["input_ids"]
        full = lm.tokenizer(p + a)["input_ids"]
        labels = torch.tensor([[-100] * len(q) + full[len(q):]])
        with torch.no_grad():
            loss = lm.model(input_ids=torch.tensor([full]), labels=labels).loss
        assert g == pytest.approx(float(loss), rel=1e-5)
