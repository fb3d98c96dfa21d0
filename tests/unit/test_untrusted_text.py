"""A model's output is data: any text passes every stage that consumes it, in bounded time.

- The call parser (``tasks/json_scan.py``) finds the same call as the decoder-per-brace
  reading it replaced, written out here as the reference, on every text both can read
  (property-based, ``hypothesis``); it reads the shapes that broke that reading (a call
  nested 1,100 deep, 2,000 nested objects before a call, a megabyte of ``{``, an unclosed
  code fence) in linear time, and an escaped lone surrogate comes out as U+FFFD.
- Every task's parse, score and pair path takes arbitrary text (lone surrogates included)
  without an exception: text generation (both post-processing rules, ROUGE and METEOR,
  both pair filters and prompt layouts) and function calling (both parse modes, the tools,
  the pair criterion, the reward text), and its rows are written and read back.
- The patterns a config applies to text run on RE2: the same matches as Python's ``re``
  on ordinary text, linear time on the texts that made ``re`` backtrack for minutes.

Stated times (``scripts/bench_untrusted_text.py`` on the 2-core development machine,
results/bench-untrusted-text/; asserted with a margin for a busy CI machine):
``parse_call`` on 1 MiB of any shape at most 2.4 s (asserted 15 s); every stage of a task
on 1 MiB, through the task (which reads ``eval.max_read_chars`` = 65,536 characters of a
generation), at most 0.6 s (asserted 10 s for all the stage passes of one text).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from fints_repro.cache import append_jsonl, read_jsonl_lenient, write_jsonl_atomic
from fints_repro.config import (DatasetConfig, EvalConfig, GenerationConfig, PairsConfig)
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.eval.rouge_pkg import MAX_WORDS, _scorer, rouge_l_f
from fints_repro.tasks import build_task
from fints_repro.tasks.function_calling import parse_call
from fints_repro.tasks.json_scan import MAX_DEPTH, JsonScan, fence_bodies
from fints_repro.tasks.prompts import extract_answer
from fints_repro.text import pattern, search, valid_strings, valid_unicode
from tests.conftest import FIXTURES

MIB = 1 << 20
CALL = '{"name": "add_product_review", "arguments": {"review": "ok"}}'
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
STAGES = settings(FUZZ, max_examples=150)  # each example runs every stage of a task


# ------------------------------------------------------------------ the reference reading


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def _reference_objects(text: str):
    """What the lenient parser read before json_scan: the whole text, each fence's body,
    then ``raw_decode`` at every ``{`` (quadratic, recursive: for small texts only)."""
    dec = json.JSONDecoder()
    for chunk in (text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))):
        try:
            yield json.loads(chunk)
        except ValueError:
            pass
    for m in re.finditer(r"\{", text):
        try:
            yield dec.raw_decode(text, m.start())[0]
        except ValueError:
            continue


def _reference_call(text: str, mode: str):
    """The reference's call object (before its fields are checked), or None."""
    def as_call(obj):
        if not isinstance(obj, dict):
            return None
        if isinstance(obj.get("tool_call"), dict):
            obj = obj["tool_call"]
        return obj if isinstance(obj.get("name"), str) else None

    if mode == "strict":
        try:
            obj = json.loads(text.strip())
        except ValueError:
            return None
        return as_call(obj["tool_call"]) if isinstance(obj, dict) and isinstance(
            obj.get("tool_call"), dict) else None
    return next((c for c in map(as_call, _reference_objects(text)) if c is not None), None)


PIECES = ["{", "}", "[", "]", '"', "\\", ":", ",", " ", "\n", "```", "```json\n", "json", "1",
          "true", "null", "-", "1e5", '"name"', '"tool_call"', '"arguments"', '"query"',
          '"review"', '"product_sequence"', '"search_product_by_query"', '"add_product_review"',
          '"get_recommendations_by_history"', '"x"', '\\"', "\\ud800", '"lamp \\ud800"', CALL,
          '{"tool_call": {"name": "search_product_by_query", "arguments": {"query": "lamp"}}}',
          '{"name": "get_recommendations_by_history", "arguments": {"product_sequence": ["B1"]}}']
JSONISH = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=40).map("".join)


@FUZZ
@given(JSONISH, st.sampled_from(["lenient", "strict"]))
def test_the_parser_finds_the_call_the_decoder_per_brace_finds(text: str, mode: str) -> None:
    assume(text.count("{") + text.count("[") <= MAX_DEPTH)  # nothing nested deeper than read
    call = _reference_call(text, mode)
    got = parse_call(text, mode)
    if call is None:
        assert got == {"error": "unparseable"}
        return
    name = valid_unicode(call["name"])
    assert got.get("name") == name
    if "error" not in got:
        assert got["arguments"] == valid_strings(call["arguments"])


@FUZZ
@given(JSONISH)
def test_each_object_is_the_json_value_at_its_brace(text: str) -> None:
    """Every object JsonScan yields is what ``raw_decode`` gives at the same brace, in the
    order of the braces, and no brace whose value decodes is skipped."""
    assume(text.count("{") + text.count("[") <= MAX_DEPTH)
    dec, want = json.JSONDecoder(), []
    for m in re.finditer(r"\{", text):
        try:
            want.append(dec.raw_decode(text, m.start())[0])
        except ValueError:
            pass
    assert list(JsonScan(text).objects()) == want


@FUZZ
@given(st.text(alphabet="`json \n{}x", max_size=60))
def test_fences_are_the_regular_expressions_fences(text: str) -> None:
    assert [text[a:b].strip() for a, b in fence_bodies(text)] == [
        m.group(1).strip() for m in _FENCE.finditer(text)]


# ------------------------------------------------------------------ the shapes that broke it


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("text,found", [
    ("[" * 1100, None),
    ('{"a":' * 2000 + "1" + "}" * 2000 + " " + CALL, "add_product_review"),
    ("{" * 1100 + CALL, "add_product_review"),
    ("```" + " " * 32_000, None),
    ("```" + " " * MIB, None),
    ("{" * MIB, None),
    ('{"a":"' * (MIB // 24), None),
    ('{"' * (MIB // 8) + CALL, "add_product_review"),
    ('{"a":1}' * (MIB // 28) + CALL, "add_product_review"),
], ids=["list-1100-deep", "2000-nested-then-call", "braces-then-call", "fence-32k", "fence-1MiB",
        "braces-1MiB", "unclosed-strings-256KiB", "brace-quote-256KiB", "objects-256KiB-then-call"])
def test_the_shapes_that_broke_the_parser_read_in_linear_time(text: str, found) -> None:
    for mode in ("lenient", "strict"):
        call, seconds = _timed(parse_call, text, mode)
        assert seconds < 15, (mode, seconds)
        assert call.get("name") == (found if mode == "lenient" else None), (mode, call)


def test_an_escaped_lone_surrogate_becomes_the_replacement_character(tmp_path: Path) -> None:
    text = '{"name": "search_product_by_query", "arguments": {"query": "lamp \\ud800"}}'
    call = parse_call(text)
    assert call == {"name": "search_product_by_query", "arguments": {"query": "lamp \ufffd"}}
    seq = parse_call('{"name": "get_recommendations_by_history", "arguments": '
                     '{"product_sequence": ["B\\udfff1"]}}')
    assert seq["arguments"]["product_sequence"] == ["B\ufffd1"]
    unknown = parse_call('{"name": "x\\ud800", "arguments": {}}')
    assert unknown == {"error": "unknown_tool", "name": "x\ufffd"}


def test_a_row_with_a_lone_surrogate_is_written_and_reads_back_the_same(tmp_path: Path) -> None:
    rows = [{"id": "1", "generation": "lamp \ud800 é"}, {"id": "2", "generation": "plain é"}]
    write_jsonl_atomic(tmp_path / "p.jsonl", rows)
    append_jsonl(tmp_path / "a.jsonl", rows)
    for name in ("p.jsonl", "a.jsonl"):
        data = (tmp_path / name).read_bytes()
        data.decode("utf-8")  # valid UTF-8 throughout
        assert read_jsonl_lenient(tmp_path / name) == rows
        assert "plain é" in data.decode()  # ordinary rows stay readable as they are


# ------------------------------------------------------------------ every stage, any text

ANY_TEXT = st.lists(st.one_of(st.characters(codec=None, categories=None),
                              st.characters(categories=["Cs"]), st.sampled_from(PIECES)),
                    max_size=80).map("".join)
TEXT_DATASET = DatasetConfig(name="demo_news", loader="demo", benchmark="demo_news", path="unused",
                             metrics=["rouge", "meteor"])
TARGET = "City council approves new budget for schools. The vote was close"
ITEM = HistoryItem("h1", "An article about the council budget.", TARGET)


ROUGE_L = rouge_scorer.RougeScorer(["rougeL"])


@pytest.fixture(scope="module")
def text_tasks():
    return [build_task(TEXT_DATASET, GenerationConfig(postprocess=p), EvalConfig(bootstrap=20))
            for p in ("strip", "fints_first_line")]


def _text_stages(tasks, generation: str) -> None:
    sample = Sample("s1", "u1", "Generate a headline for: x", TARGET, (ITEM,))
    for task in tasks:
        pred = task.parse(generation)
        scores = task.score([pred], [sample], seed=0)
        # what is scored is what the task parsed of the (first max_read_chars of the) text
        assert scores.per_sample[0]["rougeL"] == ROUGE_L.score(TARGET, pred)["rougeL"].fmeasure
        for layout in ("compact", "authors"):
            rejected = task.pair_answer(generation, layout)
            for impl in ("rouge_score", "rouge"):
                task.accept_pair(TARGET, rejected, PairsConfig(rouge_impl=impl))
        task.reward_text(generation)


@STAGES
@given(ANY_TEXT)
def test_text_generation_stages_take_any_text(text_tasks, text: str) -> None:
    _text_stages(text_tasks, text)


@pytest.mark.parametrize("shape", [
    " ".join(["council", "budget", "the"] * (MIB // 18)),  # a megabyte of words, no "."
    "".join(random.Random(0).choices("ab .\n\t{}", k=MIB)),  # punctuation soup (NLTK's punkt)
    'print("' * (MIB // 7),  # an unclosed print( repeated (the authors' answer pattern)
    "\ud800" * 1000 + "x. " * 1000,
], ids=["words-1MiB", "punctuation-1MiB", "print-1MiB", "surrogates"])
def test_text_generation_stages_on_huge_texts_in_bounded_time(text_tasks, shape: str) -> None:
    _, seconds = _timed(_text_stages, text_tasks, shape)
    assert seconds < 10, seconds


@pytest.fixture(scope="module")
def call_task():
    from fints_repro.compose import compose_run
    from fints_repro.data.pwab import pwab_samples, read_pwab

    d = compose_run(["dataset=pwab"]).dataset
    d.path = str(FIXTURES / "pwab")
    samples = pwab_samples(read_pwab(FIXTURES / "pwab"), "test", product_info_template=
                           "\nHere is the product information: {product}")
    tasks = [build_task(dataclasses.replace(d, pwab=dataclasses.replace(d.pwab, parse=mode)),
                        GenerationConfig(), EvalConfig()) for mode in ("lenient", "strict")]
    return tasks, samples


def _call_stages(call_task, generation: str, tmp_path: Path) -> None:
    tasks, samples = call_task
    for task in tasks:
        preds = [task.parse(generation) for _ in samples]
        scores = task.score(preds, samples, seed=0)
        write_jsonl_atomic(tmp_path / "predictions.jsonl",
                           [{"prediction": p, "scores": s} for p, s in zip(preds, scores.per_sample)])
        assert len(read_jsonl_lenient(tmp_path / "predictions.jsonl")) == len(samples)
        rejected = task.pair_answer(generation, "compact")
        items = [HistoryItem(s.id, s.input, s.target, meta={"sample": s}) for s in samples]
        if rejected:
            task.accept_pairs([(it.output, rejected, it) for it in items])
        task.reward_text(generation)


def _review(text: str) -> str:
    return json.dumps({"name": "add_product_review", "arguments": {"review": text}})


@STAGES
@given(st.one_of(ANY_TEXT, ANY_TEXT.map(_review), JSONISH))
def test_function_calling_stages_take_any_text(call_task, tmp_path_factory, text: str) -> None:
    _call_stages(call_task, text, tmp_path_factory.mktemp("rows"))


@pytest.mark.parametrize("shape", [
    "{" * MIB,
    _review("\ud800 great " * (MIB // 12)),
    '{"name": "search_product_by_query", "arguments": {"query": "' + "lamp " * (MIB // 5) + '"}}',
    '{"name": "get_recommendations_by_history", "arguments": {"product_sequence": ['
    + ",".join(['"B0AAAAAAA1"'] * (MIB // 13)) + "]}}",
], ids=["braces-1MiB", "review-1MiB", "query-1MiB", "sequence-1MiB"])
def test_function_calling_stages_on_huge_texts_in_bounded_time(call_task, tmp_path, shape) -> None:
    _, seconds = _timed(_call_stages, call_task, shape, tmp_path)
    assert seconds < 10, seconds


# ------------------------------------------------------------------ the authors' ROUGE package


def test_the_rouge_package_scores_a_long_sentence_as_it_would_with_room_to_recurse() -> None:
    """A generation of 1,500 words without a "." made the package recurse past Python's
    limit; with room it gives the package's own value, computed here under a raised
    limit, and a text over MAX_WORDS words is not scored."""
    import sys

    hyp = " ".join(["council", "budget", "the", "new"] * 375)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        want = _scorer().get_scores(hyp, TARGET)[0]["rouge-l"]["f"]
    finally:
        sys.setrecursionlimit(old)
    sys.setrecursionlimit(200 + len(__import__("inspect").stack()))  # a caller deep in its stack
    try:
        assert rouge_l_f(hyp, TARGET) == pytest.approx(want, abs=0) and want > 0
    finally:
        sys.setrecursionlimit(old)
    assert sys.getrecursionlimit() == old
    assert rouge_l_f(" ".join(["word"] * (MAX_WORDS + 1)), TARGET) is None


# ------------------------------------------------------------------ config patterns on RE2


ANSWER = "print\\([\"'](.*?)[\"']\\)"  # dataset.pair_answer_regex of the paper presets


@FUZZ
@given(st.lists(st.sampled_from(['print("', "print('", '")', "')", "x", "\n", " ", '"', "(", ")",
                                 "é", "\ud800"]), max_size=30).map("".join))
def test_re2_finds_what_python_re_finds(text: str) -> None:
    m = re.search(ANSWER, valid_unicode(text.strip()))
    dataset = DatasetConfig(name="d", loader="demo", benchmark="t", path="-", pair_answer_regex=ANSWER)
    assert extract_answer(text, dataset, "authors") == (m.group(1) if m else "")


_PYTHON_VERDICT = re.compile(r"\s*(?i:(?:the\s+)?(?:better\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?"
                             r"[\"'*(\[]*([AB])(?![A-Za-z0-9])")


@FUZZ
@given(st.lists(st.sampled_from(["A", "B", "AB", "answer", "Answer", "the", "better", "is", ":",
                                 "-", "*", "(", "[", '"', " ", "\n", "\x0b", "\u3000", "\u2003",
                                 "x", "1", "."]), max_size=12).map("".join))
def test_the_judges_verdict_reads_as_python_re_read_it(text: str) -> None:
    from fints_repro.backbones.reward_judge import parse_verdict

    m = _PYTHON_VERDICT.match(text)
    assert parse_verdict(text) == (m.group(1) if m else None)


def test_config_patterns_are_linear_on_the_texts_re_backtracked_on() -> None:
    from fints_repro.backbones.reward_judge import parse_verdict

    rx = pattern(ANSWER, "dataset.pair_answer_regex")
    for text in ('print("' * (MIB // 7), "answer" + " " * MIB + "x"):
        _, seconds = _timed(search, rx, text)
        assert seconds < 1, seconds
        _, seconds = _timed(parse_verdict, text)
        assert seconds < 1, seconds
