"""PersonalWAB single-turn function calling: the loader against the official file format,
the call parser, each metric against a hand computation, the tool environment, the pair
criterion, the synthetic demo, and a whole run on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig, PairsConfig, PwabDataConfig
from fints_repro.data.pwab import load_profiles, pwab_samples, read_pwab
from fints_repro.errors import ConfigError, DataError, MissingDataError
from fints_repro.tasks import build_task
from fints_repro.tasks.function_calling import (
    CooccurrenceRecommender,
    ToolEnvironment,
    execute,
    parse_call,
    rank_score,
)
from tests.conftest import FIXTURES, ROOT, assert_config_error

PWAB = FIXTURES / "pwab"
SHARED = ROOT.parent / "shared" / "data" / "personalwab"
U1, U2, U3 = ("AUSERONE00000000000000000001", "AUSERTWO00000000000000000002",
              "AUSERTHREE000000000000000003")


def _samples(split="test", **kw):
    return pwab_samples(read_pwab(PWAB), split, product_info_template="\nHere is the product "
                        "information: {product}", **kw)


def _dataset(path=PWAB, **pwab) -> DatasetConfig:
    from fints_repro.compose import compose_run

    d = compose_run(["dataset=pwab"]).dataset
    d.path = str(path)
    for k, v in pwab.items():
        setattr(d.pwab, k, v)
    return d


def _task(d: DatasetConfig | None = None):
    return build_task(d or _dataset(), GenerationConfig(), EvalConfig())


# ---- loader -----------------------------------------------------------------------------
def test_loader_reads_the_official_format_with_memory_older_than_the_task() -> None:
    s = _samples()
    assert [x.type for x in s] == ["search", "review", "recommend", "recommend"]
    first = s[0]
    assert first.user == U1 and first.input == f"USER {U1}: I want a small backpack."
    # the target purchase itself (timestamp 5000) is not in the memory; the three before are
    assert [h.meta["parent_asin"] for h in first.history] == ["B0AAAAAAA1", "B0AAAAAAA3", "B0AAAAAAA5"]
    assert first.meta["target_asin"] == "B0AAAAAAA2"
    assert "- Title: Quillon Trail Backpack" in first.history[0].input
    assert "- Text: Great pack, roomy." in first.history[0].output
    # review tasks add the product information
    assert "Here is the product information: Product:\n- Title: Orbitek Earbuds" in s[1].input
    assert s[1].meta["target_review"] == "Fits well."
    assert [_task().retrieval_query(x) for x in s[:2]] == ["I want a small backpack.",
                                                           "Please review these earbuds."]
    # a task older than every history item: empty memory, no crash
    assert s[3].history == ()
    # gold calls
    assert json.loads(s[0].target) == {"tool_call": {"name": "search_product_by_query",
                                                     "arguments": {"query": "Quillon Daypack Mini"}}}
    assert json.loads(s[2].target)["tool_call"]["arguments"]["product_sequence"] == [
        "B0AAAAAAA1", "B0AAAAAAA3", "B0AAAAAAA5"]
    assert json.loads(s[3].target)["tool_call"]["arguments"]["product_sequence"] == []
    assert json.loads(s[1].target)["tool_call"] == {"name": "add_product_review",
                                                   "arguments": {"review": "Fits well."}}


def test_min_train_tasks_keeps_users_with_enough_training_tasks() -> None:
    assert {x.user for x in _samples(min_train_tasks=2)} == {U1}
    assert {x.user for x in _samples(min_train_tasks=1)} == {U1, U2, U3}


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "pwab"
    shutil.copytree(PWAB, dst)
    return dst


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message, record", [
    (lambda d: d["test"][1].update(type="browse"), "field 'type' must be one of", "test[1]"),
    (lambda d: d["train"][0].pop("task"), "'task.task' must be a non-empty string", "train[0]"),
    (lambda d: d["test"][0]["target"]["product_info"].update(parent_asin="B0NOTTHERE"),
     "not in the catalogue", "test[0]"),
    (lambda d: d["test"][0].update(timestamp="yesterday"), "must be a number", "test[0]"),
    (lambda d: d["test"][1]["target"].pop("review"), "'target.review'", "test[1]"),
    (lambda d: d["test"][0].update(user_id="ANOBODY"), "has no entry", "test[0]"),
])
def test_malformed_tasks_fail_at_load_naming_file_and_record(tmp_path, edit, message, record) -> None:
    root = _copy(tmp_path)
    _edit(root / "user_instructions.json", edit)
    with pytest.raises(DataError, match=message) as e:
        read_pwab(root)
    assert e.value.record == record and e.value.file.endswith("user_instructions.json")


def test_malformed_history_and_catalogue_name_file_and_record(tmp_path) -> None:
    root = _copy(tmp_path)
    _edit(root / "user_history_part_1.json", lambda d: d[U2][1]["review"].pop("timestamp"))
    with pytest.raises(DataError, match="review.timestamp") as e:
        read_pwab(root)
    assert e.value.record == f"{U2}[1]" and e.value.file.endswith("user_history_part_1.json")
    root = _copy(tmp_path / "b")
    _edit(root / "all_products_part_2.json", lambda d: d["B0AAAAAAA5"].update(parent_asin="X"))
    with pytest.raises(DataError, match="keyed by 'B0AAAAAAA5'") as e:
        read_pwab(root)
    assert e.value.file.endswith("all_products_part_2.json")


def test_missing_files_say_what_was_looked_for(tmp_path) -> None:
    from fints_repro.data.load import load_samples

    d = _dataset(tmp_path / "nothing")
    with pytest.raises(MissingDataError, match="user_instructions.json") as e:
        load_samples(d, seed=0)
    assert "PersonalWAB" in str(e.value) and "+exp=demo_pwab" in str(e.value)
    root = _copy(tmp_path)
    (root / "all_products_part_1.json").unlink()
    (root / "all_products_part_2.json").unlink()
    with pytest.raises(MissingDataError, match="all_products_part_"):
        read_pwab(root)


@pytest.mark.skipif(not (SHARED / "user_profiles.json").exists(),
                    reason="the PersonalWAB profiles are not in ../shared")
def test_profile_loader_reads_the_real_benchmark_profiles() -> None:
    profiles = load_profiles(SHARED / "user_profiles.json")
    assert len(profiles) == 1000
    assert profiles["AGMQSZEQFFKH33FJQZLN7MF5QX2Q"]["Gender"] == "Male"
    assert all(len(p) == 11 for p in profiles.values())


def test_profile_loader_names_a_bad_record(tmp_path) -> None:
    p = tmp_path / "user_profiles.json"
    p.write_text(json.dumps({"AX": {"user_profile": {"Gender": "F"}}}))
    with pytest.raises(DataError, match="lacks") as e:
        load_profiles(p)
    assert e.value.record == "AX"


# ---- parsing ----------------------------------------------------------------------------
CALL = {"name": "search_product_by_query", "arguments": {"query": "lamp"}}


@pytest.mark.parametrize("text", [
    json.dumps({"tool_call": CALL}),
    "Sure! Here it is:\n```json\n" + json.dumps({"tool_call": CALL}) + "\n```\nAnything else?",
    "I will search. " + json.dumps({"tool_call": CALL}) + " done",
    json.dumps(CALL),  # without the wrapper
    "{not json} then " + json.dumps({"tool_call": CALL}),
])
def test_lenient_parser_finds_the_call(text) -> None:
    assert parse_call(text) == CALL


def test_strict_parser_is_the_authors_json_loads_of_the_whole_output() -> None:
    assert parse_call("  " + json.dumps({"tool_call": CALL}) + "\n", "strict") == CALL
    assert parse_call("```json\n" + json.dumps({"tool_call": CALL}) + "\n```", "strict") == {"error": "unparseable"}
    assert parse_call(json.dumps(CALL), "strict") == {"error": "unparseable"}


def test_a_reward_model_reads_call_candidates_as_the_pairs_sides_are_written(tmp_path,
                                                                            monkeypatch) -> None:
    """A candidate reaches a reward model in the pairs' serialisation (``call_json``; an
    unparseable one as written), and a user's trained reward model scores call candidates
    (parsed calls are dicts, not texts)."""
    import fints_repro.backbones.reward_model as rm_mod
    import fints_repro.backbones.reward_trained as trained
    from fints_repro.backbones import FitContext, build_backbone
    from fints_repro.backbones import backbone_schema
    from fints_repro.backbones.reward_model import RewardModelSettings
    from fints_repro.config import ModelConfig, TrainConfig
    from fints_repro.data.pwab import call_json
    from fints_repro.data.schema import Sample
    from fints_repro.models.loading import load_model
    from fints_repro.preferences.pairs import Pair

    task = _task()
    fenced = "Here:\n```json\n" + json.dumps(CALL) + "\n```"
    assert task.reward_text(fenced) == call_json(CALL["name"], CALL["arguments"])
    assert task.reward_text("  no call here \n") == "no call here"
    other = call_json("add_product_review", {"review": "fine"})
    pairs = {U1: [Pair(U1, f"t{i}", f"USER {U1}: a lamp {i}", call_json(CALL["name"], CALL["arguments"]),
                       other, 0.0, 0) for i in range(4)]}
    monkeypatch.setattr(rm_mod, "reward_pairs", lambda pairs_cfg, samples, source: pairs)
    seen: list[str] = []
    real = trained.reward_sequence
    monkeypatch.setattr(trained, "reward_sequence",
                        lambda tok, q, a, *rest: seen.append(a) or real(tok, q, a, *rest))
    cfg = backbone_schema()(name="reward_model", reward_model=RewardModelSettings(
        base="zero_shot", n=2, train=TrainConfig(lr=3e-3, epochs=1, batch_size=4, max_length=256)))
    bb = build_backbone(cfg, task, lambda: None)
    res = FitContext(cache_dir=tmp_path, batch_size=4)
    lm = load_model(ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama",
                                dtype="float32", device="cpu"))
    samples = [Sample("s0", U1, f"USER {U1}: I want a lamp.", call_json(CALL["name"], CALL["arguments"]), ())]
    bb.fit(lm, samples, res)
    seen.clear()
    [scores] = bb.selector.reward_scores(samples, [[fenced, "no call here"]])
    assert len(scores) == 2 and all(isinstance(x, float) for x in scores)
    assert seen == [call_json(CALL["name"], CALL["arguments"]), "no call here"]
    bb.close(lm)


@pytest.mark.parametrize("call, kind", [
    ("no call at all", "unparseable"),
    ({"name": "buy_now", "arguments": {}}, "unknown_tool"),
    ({"name": "search_product_by_query", "arguments": {}}, "missing_argument"),
    ({"name": "search_product_by_query"}, "missing_argument"),
    ({"name": "search_product_by_query", "arguments": {"query": 3}}, "bad_argument_type"),
    ({"name": "get_recommendations_by_history", "arguments": {"product_sequence": "B01"}}, "bad_argument_type"),
    ({"name": "get_recommendations_by_history", "arguments": {"product_sequence": [1, 2]}}, "bad_argument_type"),
    ({"name": "add_product_review", "arguments": "great"}, "bad_argument_type"),
    ({"name": "add_product_review", "arguments": {"review": "ok", "stars": 5}}, "extra_argument"),
])
def test_bad_calls_are_classified(call, kind) -> None:
    text = call if isinstance(call, str) else json.dumps({"tool_call": call})
    assert parse_call(text)["error"] == kind


# ---- metrics ----------------------------------------------------------------------------
def test_rank_score_is_one_minus_rank_over_the_number_of_results() -> None:
    res = [f"B{i}" for i in range(10)]
    assert rank_score(res, "B0") == 1.0
    assert rank_score(res, "B3") == pytest.approx(0.7)
    assert rank_score(res[:4], "B3") == pytest.approx(0.25)  # 1 - 3/4
    assert rank_score(res, "B99") == 0.0 and rank_score([], "B0") == 0.0


class _FixedEnv:
    """Fixed tool results, so the scores can be computed by hand."""

    result_texts = None  # a hit is the target product itself

    def search(self, queries):
        return [["X", "T1", "Y", "Z"] for _ in queries]

    def recommend(self, seqs):
        return [["T2"] + ["W"] * 9 if s else [] for s in seqs]

    def review_similarity(self, written, gold):
        return [0.5 if w == g else 0.25 for w, g in zip(written, gold)]


def test_scores_and_aggregates_against_a_hand_computation(monkeypatch) -> None:
    from fints_repro.data.schema import Sample

    task = _task()
    monkeypatch.setattr(type(task), "environment", property(lambda self: _FixedEnv()))
    samples = [Sample("a", "u", "", "", type="search", meta={"target_asin": "T1"}),
               Sample("b", "u", "", "", type="recommend", meta={"target_asin": "T2"}),
               Sample("c", "u", "", "", type="recommend", meta={"target_asin": "T2"}),
               Sample("d", "u", "", "", type="review", meta={"target_asin": "R", "target_review": "g"}),
               Sample("e", "u", "", "", type="review", meta={"target_asin": "R", "target_review": "g"}),
               Sample("f", "u", "", "", type="search", meta={"target_asin": "T1"})]
    preds = [parse_call(json.dumps({"tool_call": c})) for c in [
        {"name": "search_product_by_query", "arguments": {"query": "q"}},  # rank 1 of 4: 0.75
        {"name": "get_recommendations_by_history", "arguments": {"product_sequence": ["A"]}},  # 1.0
        {"name": "get_recommendations_by_history", "arguments": {"product_sequence": []}},  # [] -> 0
        {"name": "add_product_review", "arguments": {"review": "g"}},  # 0.5
        {"name": "search_product_by_query", "arguments": {"query": "q"}},  # wrong tool: 0, 0
        {"name": "nope", "arguments": {}},  # unknown tool: 0, 0
    ]]
    sc = task.score(preds, samples, seed=0)
    facc = [1, 1, 1, 1, 0, 0]
    racc = [0.75, 1.0, 0.0, 0.5, 0.0, 0.0]
    assert [r["function_accuracy"] for r in sc.per_sample] == facc
    assert [r["result_accuracy"] for r in sc.per_sample] == racc
    assert [r["call_error"] for r in sc.per_sample] == [None] * 4 + ["wrong_tool", "unknown_tool"]
    a = sc.aggregate
    assert a["function_accuracy"] == pytest.approx(4 / 6)
    assert a["result_accuracy"] == pytest.approx(sum(racc) / 6)
    assert a["search/function_accuracy"] == 0.5 and a["search/result_accuracy"] == 0.375
    assert a["recommend/result_accuracy"] == 0.5 and a["review/result_accuracy"] == 0.25
    assert a["review/function_accuracy"] == 0.5 and a["search/n"] == 2
    assert (a["n_wrong_tool"], a["n_unknown_tool"], a["n_unparseable"]) == (1, 1, 0)


def test_search_is_bm25_over_the_catalogue_and_returns_matching_products_only() -> None:
    files = read_pwab(PWAB)
    env = ToolEnvironment(files.products, files.history, PwabDataConfig())
    res = env.search(["Daypack", "Luma lamp", "zzzz unknownword", ""])
    assert res[0] == ["B0AAAAAAA2"]  # the only product with the word
    assert set(res[1]) == {"B0AAAAAAA3", "B0AAAAAAA4"}
    assert res[2] == [] and res[3] == []
    # the ranking equals bm25s's own scores over the same product texts (k1 0.9, b 0.4)
    import bm25s

    from fints_repro.data.pwab import product_text

    idx = bm25s.BM25(k1=0.9, b=0.4)
    idx.index(bm25s.tokenize([product_text(files.products[a]) for a in env.asins], stopwords="en",
                             show_progress=False), show_progress=False)
    scores = idx.get_scores(["luma", "lamp"])
    want = [env.asins[j] for j in np.argsort(-scores, kind="stable") if scores[j] > 0]
    assert res[1] == want


def test_cooccurrence_recommender_by_hand() -> None:
    rec = CooccurrenceRecommender([["a", "b", "c"], ["a", "b"], ["b", "d"]], ["a", "b", "c", "d", "e"])
    # with a: b co-occurs twice, c once; then the most bought (d once, e never)
    assert rec.recommend(["a"], 3) == ["b", "c", "d"]
    # with b: a twice, then c and d once each: c and d tie on co-occurrence and popularity,
    # catalogue order decides
    assert rec.recommend(["b"], 4) == ["a", "c", "d", "e"]
    assert rec.recommend(["zzz"], 3) == []  # unknown ASINs are dropped; none left: nothing
    assert rec.recommend(["a", "b"], 2) == ["c", "d"]


def test_recommender_is_trained_on_training_split_history_only() -> None:
    files = read_pwab(PWAB)
    env = ToolEnvironment(files.products, files.history, PwabDataConfig())
    # B0AAAAAAA2 (split test for U1) co-occurs with nothing in training
    assert env.recommender.popularity["B0AAAAAAA2"] == 0
    assert env.recommender.popularity["B0AAAAAAA5"] == 2


# ---- pairs ------------------------------------------------------------------------------
def _train_item(sample):
    from fints_repro.data.schema import HistoryItem

    return HistoryItem(sample.id, sample.input, sample.target, sample.timestamp, meta={"sample": sample})


def test_pair_criterion_follows_the_authors_thresholds(monkeypatch) -> None:
    task = _task()
    monkeypatch.setattr(type(task), "environment", property(lambda self: _FixedEnv()))
    train = {s.type: s for s in _samples("train")}
    search, rec, review = (_train_item(train[t]) for t in ("search", "recommend", "review"))
    search.meta["sample"].meta["target_asin"] = "T1"  # _FixedEnv ranks it 2nd of 4: 0.75
    rec.meta["sample"].meta["target_asin"] = "T2"

    def c(name, **args):
        return json.dumps({"tool_call": {"name": name, "arguments": args}})

    triples = [
        (search.output, c("add_product_review", review="x"), search),  # wrong tool: kept
        (search.output, c("search_product_by_query", query="q"), search),  # 0.75 >= 0.65: dropped
        (rec.output, c("get_recommendations_by_history", product_sequence=[]), rec),  # never
        (review.output, c("add_product_review", review="other"), review),  # 0.25 < 0.51: kept
        (review.output, c("add_product_review", review=review.meta["sample"].meta["target_review"]), review),  # 0.5 < 0.51: kept
        (search.output, "not a call", search),  # unparseable: dropped
    ]
    verdicts = task.accept_pairs(triples, PairsConfig())
    assert [v.keep for v in verdicts] == [True, False, False, True, True, False]
    d = _dataset(search_threshold=0.8, review_threshold=0.3)
    task2 = _task(d)
    monkeypatch.setattr(type(task2), "environment", property(lambda self: _FixedEnv()))
    assert [v.keep for v in task2.accept_pairs(triples[1:2] + triples[3:5])] == [True, True, False]
    assert task.pair_answer("blah", "compact") == ""
    assert json.loads(task.pair_answer("x " + c("add_product_review", review="r"), "compact")) == {
        "tool_call": {"name": "add_product_review", "arguments": {"review": "r"}}}


def test_call_serialisation_same_by_default_authors_as_an_option() -> None:
    task = _task()
    chosen = json.dumps({"tool_call": CALL})
    rej = json.dumps({"tool_call": {"name": "add_product_review", "arguments": {"review": "r"}}})
    assert task.pair_sides(chosen, rej, PairsConfig()) == (chosen, rej)
    c, r = task.pair_sides(chosen, rej, PairsConfig(call_serialisation="authors"))
    assert json.loads(c) == CALL and r == rej


def test_pairs_are_made_from_training_tasks_with_other_users_memory(tmp_path) -> None:
    from fints_repro.preferences.pairs import build_pairs
    from fints_repro.models.loading import load_model
    from fints_repro.compose import compose_run

    cfg = compose_run(["model=tiny_random_llama", f"cache_dir={tmp_path}"])
    lm = load_model(cfg.model, str(tmp_path))
    d = _dataset()
    task = _task(d)
    train = _samples("train")
    items = {}
    for s in train:
        items.setdefault(s.user, []).append(_train_item(s))
    prompts = []
    from fints_repro.preferences import pairs as pairs_mod

    real = pairs_mod.generate_cached

    def fake(lm, texts, params, **kwargs):
        prompts.extend(texts)
        answer = json.dumps({"tool_call": {"name": "add_product_review", "arguments": {"review": "r"}}})
        return [answer] * len(texts), len(texts)

    pairs_mod.generate_cached = fake
    try:
        out = build_pairs(_samples(), lm, d, PairsConfig(source="train_samples", attempts=1),
                          cache_dir=tmp_path, seed=0, items_by_user=items, task=task, progress=False)
    finally:
        pairs_mod.generate_cached = real
    # every search/recommend task gets its pair (wrong tool); the review task's rejected
    # review "r" is kept only if less similar than 0.51 to its gold review
    got = {p.item_id for ps in out.values() for p in ps}
    assert {"train-0", "train-1", "train-3"} <= got
    for ps in out.values():
        for p in ps:
            assert json.loads(p.chosen)["tool_call"]  # same serialisation on both sides
            assert json.loads(p.rejected)["tool_call"]["name"] == "add_product_review"
    # the generator saw other users' memory, never the user's own
    assert len(prompts) == 4
    first_u1 = next(t for t in prompts if f"USER {U1}: Find me a lamp" in t)
    assert "Your Memory of This User:" in first_u1
    assert "Great pack, roomy." not in first_u1 and "Bright lamp." not in first_u1


# ---- the demo ---------------------------------------------------------------------------
def test_demo_is_deterministic_and_its_preferences_decide_success() -> None:
    from fints_repro.data.demo_pwab import generate_demo_pwab

    spec = dict(n_users=8, n_background_users=48, n_history=6, n_train_tasks=4, n_test_tasks=3)
    a, b = generate_demo_pwab(**spec, seed=0), generate_demo_pwab(**spec, seed=0)
    assert a == b and a != generate_demo_pwab(**spec, seed=1)
    assert len(a["products"]) == 288 and len(a["instructions"]["test"]) == 24
    with pytest.raises(ConfigError, match="n_history"):
        generate_demo_pwab(**{**spec, "n_train_tasks": 9}, seed=0)


def test_demo_runs_through_the_official_loader_and_the_tools(tmp_path) -> None:
    from fints_repro.data.load import load_samples

    d = _dataset()
    d.loader, d.name, d.path = "demo_pwab", "demo_pwab", str(tmp_path / "demo")
    samples = load_samples(d, seed=0)
    assert (Path(d.path).iterdir().__next__() / "SYNTHETIC.txt").exists()
    task = _task(d)
    # the retrieval query is the task text alone, without the user id, the review's
    # product information or the demo's reminder
    d.pwab.user_turn_suffix = "\n\nAnswer with one JSON tool call and nothing else."
    from fints_repro.compose import compose_run

    d.query_regex = compose_run(["dataset=demo_pwab"]).dataset.query_regex
    reminded = load_samples(d, seed=0)
    assert all(s.input.endswith(d.pwab.user_turn_suffix) for s in reminded)
    assert [task.retrieval_query(s) for s in reminded] == [s.meta["task"] for s in reminded]
    search = [s for s in samples if s.type == "search"]
    gold = [json.loads(s.target)["tool_call"] for s in search]
    titles = [g["arguments"]["query"].split() for g in gold]
    env = task.environment

    def racc(queries):
        ex = execute(env, [{"name": "search_product_by_query", "arguments": {"query": q}} for q in queries],
                     ["search"] * len(search), [s.meta["target_asin"] for s in search], [""] * len(search))
        return sum(e.result_accuracy for e in ex) / len(ex)

    # the user's store and line in the query find the target; the task's own words do not
    assert racc([f"{t[0]} {t[2]} {' '.join(t[3:])}" for t in titles]) == 1.0
    assert racc([s.meta["task"] for s in search]) < 0.4
    # the gold calls score: every tool right, the recommendation high
    sc = task.score([task.parse(s.target) for s in samples], samples, seed=0)
    assert sc.aggregate["function_accuracy"] == 1.0
    assert sc.aggregate["search/result_accuracy"] == 1.0
    assert sc.aggregate["review/result_accuracy"] == pytest.approx(1.0, abs=1e-5)
    assert sc.aggregate["recommend/result_accuracy"] > 0.7


# ---- a whole run ------------------------------------------------------------------------


def test_memory_last_takes_the_most_recent_items_first() -> None:
    from fints_repro.backbones import build_backbone
    from fints_repro.compose import compose_run

    cfg = compose_run(["dataset=pwab", "backbone=rag", "backbone.memory=last", "backbone.k=2"])
    task = _task()
    bb = build_backbone(cfg.backbone, task, lambda: None)
    p = bb.build_prompts(_samples())[0]
    assert p.history_ids == [f"{U1}:B0AAAAAAA5:3000", f"{U1}:B0AAAAAAA3:2000"]
    assert p.text.index("MEMORY 0:") < p.text.index("Orbitek Headphones") < p.text.index("MEMORY 1:")


def test_sasrec_recommender_equals_a_hand_written_forward(tmp_path) -> None:
    """The checkpoint layout loads as it is, and the recommendation equals a forward pass
    written out with plain tensor operations (embedding x sqrt(H) + positions of the
    non-padding items, per block Q = LN(x), x = Q + causal attention(Q, x, x), x = FF(LN(x))
    + residual, final LN; scores = last position . item embeddings of the mapped items)."""
    import torch
    import torch.nn.functional as F

    from fints_repro.tasks.sasrec import SASRec, SASRecRecommender

    torch.manual_seed(0)
    model = SASRec(n_items=20, hidden=8, blocks=2, heads=2, maxlen=5).eval()
    torch.save(model.state_dict(), tmp_path / "sasrec.pth")
    ids = {f"B{i:02d}": i for i in range(3, 15)}  # 12 mapped items of the 20
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    rec = SASRecRecommender(tmp_path / "sasrec.pth", tmp_path / "ids.json", maxlen=5)
    seqs = [["B03", "B07", "NOPE", "B05"], ["B04", "B05", "B06", "B07", "B08", "B09", "B10"],
            ["NOPE"], []]
    got = rec.recommend_many(seqs, k=4)
    assert got[2] == [] and got[3] == []

    sd = model.state_dict()

    def forward(item_ids: list[int]) -> torch.Tensor:
        seq = torch.tensor([0] * (5 - len(item_ids)) + item_ids)
        x = sd["item_emb.weight"][seq] * 8 ** 0.5
        pos = torch.arange(1, 6) * (seq != 0)
        x = x + sd["pos_emb.weight"][pos]
        causal = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
        for b in range(2):
            p = f"attention_layers.{b}."
            q = F.layer_norm(x, (8,), sd[f"attention_layernorms.{b}.weight"], sd[f"attention_layernorms.{b}.bias"], 1e-8)
            wq, wk, wv = sd[p + "in_proj_weight"].chunk(3)
            bq, bk, bv = sd[p + "in_proj_bias"].chunk(3)
            Q, K, V = q @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
            heads = []
            for h in range(2):
                s = slice(4 * h, 4 * h + 4)
                att = torch.softmax(Q[:, s] @ K[:, s].T / 2.0 + causal, dim=-1)
                heads.append(att @ V[:, s])
            out = torch.cat(heads, -1) @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]
            x = q + out
            x = F.layer_norm(x, (8,), sd[f"forward_layernorms.{b}.weight"], sd[f"forward_layernorms.{b}.bias"], 1e-8)
            f = f"forward_layers.{b}."
            hdn = torch.relu(x @ sd[f + "conv1.weight"][:, :, 0].T + sd[f + "conv1.bias"])
            x = hdn @ sd[f + "conv2.weight"][:, :, 0].T + sd[f + "conv2.bias"] + x
        x = F.layer_norm(x, (8,), sd["last_layernorm.weight"], sd["last_layernorm.bias"], 1e-8)
        cands = torch.tensor(sorted(ids.values()))
        scores = sd["item_emb.weight"][cands] @ x[-1]
        return [f"B{int(cands[j]):02d}" for j in torch.argsort(-scores)[:4]]

    assert got[0] == forward([3, 7, 5])  # the unknown ASIN dropped
    assert got[1] == forward([6, 7, 8, 9, 10])  # the last 5 kept
    # dataset.pwab.recommender=sasrec: the environment's recommend tool is that model
    env = ToolEnvironment({}, {}, PwabDataConfig(recommender="sasrec", recommend_k=4, max_sequence=5,
                                                 sasrec_checkpoint=str(tmp_path / "sasrec.pth"),
                                                 sasrec_item_ids=str(tmp_path / "ids.json")))
    assert env.recommend(seqs) == got
    with pytest.raises(ConfigError, match="sasrec_checkpoint"):
        SASRecRecommender(tmp_path / "missing.pth", tmp_path / "ids.json")


@pytest.mark.parametrize("override, key", [
    ("dataset.pwab.parse=fuzzy", "dataset.pwab.parse"),
    ("dataset.pwab.recommender=sasrec", "dataset.pwab.recommender"),  # no checkpoint given
    ("dataset.pwab.search_k=0", "dataset.pwab.search_k"),
    ("dataset.pwab.search_threshold=1.5", "dataset.pwab.search_threshold"),
    ("steering.pairs.call_serialisation=bare", "steering.pairs.call_serialisation"),
    ("backbone.memory=oldest", "backbone.memory"),
])
def test_bad_function_calling_config_fails_at_start_naming_the_key(override, key) -> None:
    assert_config_error(["+exp=demo_pwab", override], key)


