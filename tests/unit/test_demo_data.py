"""The SYNTHETIC demo_news data: determinism, layout, styles, drift, LaMP-4 files, learnability."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from datetime import date

import pytest

from fints_repro.data import demo
from fints_repro.data.demo import (
    DRIFT_TAIL_FRACTION,
    PROMPT,
    STYLES,
    TOPICS,
    base_headline,
    generate_demo_news,
    render_headline,
    timestamp_to_date,
    write_lamp_format,
)

N_STYLES = len(STYLES)
SMALL = dict(n_users=8, n_history=12, n_test=4, seed=0)


def _gen(**kw):
    return generate_demo_news(**{**SMALL, **kw})


def _full(samples):
    """Everything a sample holds, meta included (dataclass equality skips meta)."""
    return [(s.to_dict(), s.meta, [h.meta for h in s.history]) for s in samples]


def _by_user(samples):
    users = defaultdict(list)
    for s in samples:
        users[s.user].append(s)
    return users


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _f1(pred: str, ref: str) -> float:
    p, r = _tokens(pred), _tokens(ref)
    overlap = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not overlap:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(r)
    return 2 * prec * rec / (prec + rec)


def _n_tail(n_history: int) -> int:
    return math.ceil(DRIFT_TAIL_FRACTION * n_history)


# ------------------------------------------------------------------------- determinism

def test_same_arguments_same_output_and_seed_changes_it():
    a, b = _gen(), _gen()
    assert _full(a) == _full(b)
    assert _full(_gen(drift=True)) == _full(_gen(drift=True))
    c = _gen(seed=1)
    assert [s.input for s in a] != [s.input for s in c]
    assert [s.target for s in a] != [s.target for s in c]


_DIGEST = (
    "import hashlib, json; from fints_repro.data.demo import generate_demo_news as g; "
    "s = g(n_users=10, n_history=6, n_test=2, seed=3, drift=True); "
    "print(hashlib.sha256(json.dumps([(x.to_dict(), x.meta, [h.meta for h in x.history]) "
    "for x in s], sort_keys=True).encode()).hexdigest())"
)


def test_adding_users_keeps_earlier_users():
    few, more = _gen(n_users=3), _gen(n_users=5)
    assert _full(few) == _full(more[: len(few)])


# ------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("drift", [False, True])
def test_counts_ids_and_timestamps(drift):
    n_users, n_history, n_test = 6, 10, 3
    samples = _gen(n_users=n_users, n_history=n_history, n_test=n_test, drift=drift)
    assert len(samples) == n_users * n_test
    assert len({s.id for s in samples}) == len(samples)
    users = _by_user(samples)
    assert len(users) == n_users
    for user, items in users.items():
        assert len(items) == n_test
        history = items[0].history
        assert all(s.history == history for s in items)  # one user, one history
        assert len(history) == n_history
        assert len({h.id for h in history}) == n_history
        ts = [h.timestamp for h in history]
        assert all(isinstance(t, int) for t in ts)
        assert all(x < y for x, y in zip(ts, ts[1:]))
        test_ts = [s.timestamp for s in items]
        assert all(isinstance(t, int) for t in test_ts)
        assert test_ts[0] > ts[-1]
        assert all(x < y for x, y in zip(test_ts, test_ts[1:]))
        # distinct timestamps give distinct dates (one item a day at most)
        dates = [timestamp_to_date(t) for t in ts + test_ts]
        assert dates == sorted(set(dates))
        for s in items:
            assert s.user == user
            assert s.input.startswith(PROMPT)
            assert s.target
            assert s.meta["synthetic"] is True
            assert s.meta["style"] in STYLES
            for h in s.history:
                assert h.meta["synthetic"] is True and h.meta["style"] in STYLES


def test_articles_distinct_plausible_and_hold_their_facts():
    samples = _gen(n_users=12, n_history=12, n_test=4)
    articles = {}
    for s in samples:
        articles[s.id] = (s.input[len(PROMPT):], {**s.meta, "date": timestamp_to_date(s.timestamp)})
        for h in s.history:
            articles[h.id] = (h.input, {**h.meta, "date": timestamp_to_date(h.timestamp)})
    texts = [a for a, _ in articles.values()]
    assert len(set(texts)) == len(texts)
    topics = Counter()
    for text, meta in articles.values():
        n_words = len(text.split())
        assert 55 <= n_words <= 125, (n_words, text)
        assert 3 <= len(re.findall(r"[.?!](?:\s|$)", text)) <= 7
        assert text[0].isupper() and text.endswith(".")
        facts = meta["facts"]
        # the neutral headline's key facts are in the article
        assert facts["entity"] in text and facts["place"] in text and facts["verb_past"] in text
        assert meta["base_headline"] == base_headline(facts)
        assert facts["weekday"] == date.fromisoformat(meta["date"]).strftime("%A")
        topics[meta["topic"]] += 1
    assert len(topics) >= 6  # varied topics


def test_users_favour_their_topics():
    samples = _gen(n_users=10)
    inside = total = 0
    for items in _by_user(samples).values():
        favoured = set(items[0].meta["user_topics"])
        assert 2 <= len(favoured) <= 3
        for h in items[0].history:
            inside += h.meta["topic"] in favoured
            total += 1
    assert inside / total >= 0.7


# ------------------------------------------------------------------------------ styles

def _check_markers(headline: str, style: str) -> None:
    """Style markers checked by hand (independent of the regexes in the module)."""
    if style == "question":
        assert headline.startswith("Will ") and headline.endswith("?")
    elif style == "breaking":
        assert headline.startswith("BREAKING: ")
    elif style == "lowercase_casual":
        assert headline == headline.lower() and " just " in headline
    elif style == "listicle":
        assert headline.startswith("5 things to know as ")
    elif style == "colon_place":
        place, _, rest = headline.partition(": ")
        assert place in demo.PLACES and rest
    elif style == "very_short":
        assert len(headline.split()) <= 5
    elif style == "long_detailed":
        assert len(headline.split()) >= 15 and headline.endswith("in what observers call a pivotal moment")
    elif style == "heres_why":
        assert headline.startswith("Here's why ")
    elif style == "city_desk":
        assert headline.endswith(" | City Desk")
    elif style == "moves_to":
        assert " moves to " in headline
    else:  # a new style: at least its regex
        pass
    assert re.search(STYLES[style]["marker"], headline), (style, headline)


def test_every_style_renders_its_markers_for_every_entity_and_event():
    slots = dict(money=40, vote_a=7, vote_b=2, small=3, small2=4, mid=45, big=500, k=40,
                 pct=12, approval=50, year=2027, score_a=3, score_b=1, age=24, goals=15, fee=9,
                 rank=15, price=999, grams=200, depth=2000, hours=6, mph=80, tracks=12,
                 ticket=50, cls=30, cls2=22, ordinal="third", startup="Lumora",
                 rival="Northstar Group", p2="Ana Lee", person="Tom Price", when="next month")
    for topic, spec in TOPICS.items():
        for entity, short in spec["entities"]:
            assert len(short.split()) == 1
            for ev in spec["events"]:
                assert len(ev["obj_short"].split()) <= 2
                f = {**slots, "entity": entity, "entity_short": short, "place": "Lindale",
                     "weekday": "Monday"}
                facts = {"topic": topic, "entity": entity, "entity_short": short,
                         "verb_base": ev["verb"][0], "verb_s": ev["verb"][1],
                         "verb_past": ev["verb"][2], "obj": ev["obj"].format(**f),
                         "obj_short": ev["obj_short"], "place": "Lindale",
                         "detail": ev["detail"].format(**f), "weekday": "Monday"}
                for style in STYLES:
                    headline = render_headline(style, facts)
                    _check_markers(headline, style)
                    assert headline != base_headline(facts)


@pytest.mark.parametrize("drift", [False, True])
def test_every_style_appears(drift):
    samples = _gen(n_users=N_STYLES, drift=drift)
    assert {s.meta["style"] for s in samples} == set(STYLES)
    assert {s.meta["old_style"] for s in samples} == set(STYLES)
    assert {h.meta["style"] for s in samples for h in s.history} == set(STYLES)


def test_each_user_history_shares_the_user_style():
    samples = _gen(n_users=2 * N_STYLES, n_history=8, n_test=2)
    for items in _by_user(samples).values():
        style = items[0].meta["style"]
        assert all(s.meta["style"] == style for s in items)
        for h in items[0].history:
            assert h.meta["style"] == style
            _check_markers(h.output, style)
            assert h.output == render_headline(style, h.meta["facts"])
        for s in items:
            _check_markers(s.target, style)


def test_drift_new_style_in_history_tail_and_test_items():
    n_history = 10
    samples = _gen(n_users=N_STYLES, n_history=n_history, n_test=3, drift=True)
    n_new = _n_tail(n_history)
    assert 0 < n_new < n_history
    for items in _by_user(samples).values():
        old, new = items[0].meta["old_style"], items[0].meta["new_style"]
        assert old != new and items[0].meta["drift"] is True
        history = items[0].history
        for h in history[: n_history - n_new]:
            assert h.meta["style"] == old
            _check_markers(h.output, old)
        for h in history[n_history - n_new:]:
            assert h.meta["style"] == new
            _check_markers(h.output, new)
        for s in items:
            assert s.meta["style"] == new
            _check_markers(s.target, new)
    # without drift nothing changes
    for s in _gen(n_users=N_STYLES, n_history=n_history, n_test=3):
        assert s.meta["old_style"] == s.meta["new_style"] == s.meta["style"]
        assert s.meta["drift"] is False


# ------------------------------------------------------------------------- LaMP-4 files

def test_lamp_files_round_trip(tmp_path):
    samples = _gen(n_users=4, n_history=5, n_test=2)
    q_path, o_path = write_lamp_format(samples, tmp_path / "out")
    assert q_path.name == "dev_questions.json" and o_path.name == "dev_outputs.json"
    questions = json.loads(q_path.read_text(encoding="utf-8"))
    outputs = json.loads(o_path.read_text(encoding="utf-8"))
    assert isinstance(questions, list) and len(questions) == len(samples)
    assert set(outputs) == {"task", "golds"} and outputs["task"] == "LaMP_4"
    assert [g["id"] for g in outputs["golds"]] == [s.id for s in samples]
    assert [q["id"] for q in questions] == [s.id for s in samples]
    for q, g, s in zip(questions, outputs["golds"], samples):
        assert set(q) == {"id", "input", "profile", "user_id", "date"}
        assert q["date"] == timestamp_to_date(s.timestamp)
        assert q["input"] == s.input and q["user_id"] == s.user
        assert q["input"].startswith("Generate a headline for the following article: ")
        assert set(g) == {"id", "output"} and g["output"] == s.target
        assert len(q["profile"]) == len(s.history)
        for p, h in zip(q["profile"], s.history):
            assert set(p) == {"id", "text", "title", "date"}
            assert (p["id"], p["text"], p["title"]) == (h.id, h.input, h.output)
            assert date.fromisoformat(p["date"]).isoformat() == p["date"]
            assert p["date"] == timestamp_to_date(h.timestamp)
        dates = [p["date"] for p in q["profile"]]
        assert dates == sorted(dates)


# ------------------------------------------------------------------------ learnability

def _infer_style(history) -> str:
    """The style whose template best reproduces the user's history headlines."""
    def score(style):
        return sum(_f1(render_headline(style, h.meta["facts"]), h.output) for h in history)
    return max(STYLES, key=score)


def _affix_predictor(history):
    """A trivial personaliser that knows nothing of the templates: it learns from the user's
    history headlines their common leading and trailing words and whether they are all lower
    case, and wraps a generic headline accordingly."""
    heads = [h.output.split() for h in history]
    prefix: list[str] = []
    for words in zip(*heads):
        if len(set(words)) != 1:
            break
        prefix.append(words[0])
    suffix: list[str] = []
    for words in zip(*(list(reversed(w)) for w in heads)):
        if len(set(words)) != 1:
            break
        suffix.insert(0, words[0])
    lower = all(h.output == h.output.lower() for h in history)

    def predict(generic: str) -> str:
        text = " ".join(prefix + generic.split() + suffix)
        return text.lower() if lower else text
    return predict


@pytest.mark.parametrize("drift", [False, True])
def test_style_is_learnable_from_history(drift):
    n_history = 12
    samples = _gen(n_users=N_STYLES, n_history=n_history, n_test=4, drift=drift)
    # Under drift the recent history is the evidence (its last 40 %).
    recent = _n_tail(n_history) if drift else n_history
    generic, templ, affix = [], [], []
    affix_gain = defaultdict(list)
    for items in _by_user(samples).values():
        history = items[0].history[-recent:]
        style = _infer_style(history)
        assert style == items[0].meta["style"]
        wrap = _affix_predictor(history)
        for s in items:
            g = s.meta["base_headline"]
            generic.append(_f1(g, s.target))
            templ.append(_f1(render_headline(style, s.meta["facts"]), s.target))
            affix.append(_f1(wrap(g), s.target))
            affix_gain[s.meta["style"]].append(affix[-1] - generic[-1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # the generic headline is clearly not the user's headline ...
    assert mean(generic) < 0.8
    # ... and a style inferred from the history beats it, by a wide margin with the
    # style templates and still clearly with template-free affix copying
    assert mean(templ) > mean(generic) + 0.2
    assert mean(affix) > mean(generic) + 0.03
    for style in ("listicle", "city_desk", "long_detailed", "heres_why"):
        assert min(affix_gain[style]) > 0, style


def test_drift_makes_recency_matter():
    """Under drift, inferring the style from the whole (mostly old-style) history is wrong;
    the recent history gives the right style."""
    samples = _gen(n_users=N_STYLES, n_history=12, drift=True)
    whole = recent = 0.0
    for items in _by_user(samples).values():
        history = items[0].history
        s_whole, s_recent = _infer_style(history), _infer_style(history[-3:])
        assert s_whole == items[0].meta["old_style"]
        for s in items:
            whole += _f1(render_headline(s_whole, s.meta["facts"]), s.target)
            recent += _f1(render_headline(s_recent, s.meta["facts"]), s.target)
    assert recent > whole
