"""SYNTHETIC style demo (``dataset=demo_style``): LaMP-4-style headline users whose
preferences are directions a small model can be steered along.

The articles are :mod:`fints_repro.data.demo`'s (made up from templates, nothing real).
What differs is how users write their headlines: not fixed words a 135M model's activation
directions do not carry (``BREAKING:``), but a *register*:

==============  ======================================================================
``casual``      chatty and exclamatory: "Whoa, Novalink's gonna recall smart speakers!"
                (one of :data:`CASUAL_TEMPLATES`, chosen per item)
``formal``      the neutral newsroom headline: "Novalink recalls 40,000 smart speakers
                in Ashford" (:func:`fints_repro.data.demo.base_headline`)
``positive``    upbeat: "Great news for Ashford: Novalink recalls 40,000 smart speakers"
                (one of :data:`POSITIVE_TEMPLATES`)
==============  ======================================================================

Users come in *kinds* (:data:`KINDS`): ``casual``, ``formal`` and ``positive`` users write
every headline in that register, on articles of any topic; ``topic`` users write
**casual headlines on sports articles and formal ones on politics** (their items are
half sports, half politics). A topic user's user-level vector (the mean over all their
pairs) is a half-strength casual direction on every input; a per-input vector built
from the pairs most similar to the article can be casual on sports and near zero on
politics: the setting where the paper's fine-grained steering should beat user-level
CAA.

Every sample's preference is kept beside the official files (``dev_styles.json``:
``{id: {kind, preference, topic}}``) and read back into ``Sample.meta`` (``kind``,
``preference``, ``topic``); ``Sample.type`` is the user's kind, or ``topic_casual`` /
``topic_formal`` for a topic user's sports / politics items, so every metric is also
reported per kind. The style metric (:mod:`fints_repro.eval.style`) scores a prediction
for its sample's preference.

Determinism as in :mod:`fints_repro.data.demo`: each user draws from its own
``random.Random`` seeded with a string of the seed, the kind and the user's index within
the kind, so adding users of one kind leaves every other user unchanged.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from fints_repro.data.demo import (
    DAY,
    EPOCH_START,
    GAP_DAYS,
    PROMPT,
    TOPIC_NAMES,
    WEEKDAYS,
    base_headline,
    distinct_article,
    write_lamp_format,
)
from fints_repro.data.schema import HistoryItem, Sample

PREFERENCES = ("casual", "formal", "positive")

CASUAL_TEMPLATES: tuple[str, ...] = (
    "Whoa, {entity_short}'s gonna {verb_base} {obj_short}!",
    "{entity_short} just {verb_past} {obj_short} and folks can't believe it!",
    "No way! {entity_short} {verb_past} {obj_short}!",
    "Guess what? {entity_short} totally {verb_past} {obj_short}!",
    "Wow, {entity_short} {verb_past} {obj_short} in {place}, and it's huge!",
)
POSITIVE_TEMPLATES: tuple[str, ...] = (
    "Great news for {place}: {entity} {verb_s} {obj}",
    "{entity} {verb_s} {obj} in a welcome boost for {place}",
    "Good news as {entity} proudly {verb_s} {obj}",
    "{entity} {verb_s} {obj}, a bright success for {place}",
)

# kind -> (topics its items are drawn from (None: all, uniformly), preference per topic
# ("*": every topic))
KINDS: dict[str, tuple[tuple[str, ...] | None, dict[str, str]]] = {
    "casual": (None, {"*": "casual"}),
    "formal": (None, {"*": "formal"}),
    "positive": (None, {"*": "positive"}),
    "topic": (("sports", "politics"), {"sports": "casual", "politics": "formal"}),
}

STYLES_FILE = "dev_styles.json"


def render(preference: str, facts: Mapping[str, str], rng: random.Random) -> str:
    """A headline in ``preference``'s register over an article's facts."""
    if preference == "formal":
        return base_headline(dict(facts))
    templates = {"casual": CASUAL_TEMPLATES, "positive": POSITIVE_TEMPLATES}.get(preference)
    if templates is None:
        raise ValueError(f"unknown preference {preference!r}; known: {PREFERENCES}")
    return rng.choice(templates).format(**facts)


def sample_type(kind: str, preference: str) -> str:
    """What a sample's ``type`` is: the kind, or ``topic_<preference>`` for a topic user."""
    return f"{kind}_{preference}" if kind == "topic" else kind


def generate_demo_style(*, users: Mapping[str, int], n_history: int, n_test: int,
                        seed: int) -> list[Sample]:
    """SYNTHETIC samples: ``users[kind]`` users of each kind (:data:`KINDS`), each with
    ``n_test`` test samples sharing its ``n_history`` earlier (article, headline) items.
    ``meta`` of samples and history items: ``synthetic``, ``kind``, ``preference``,
    ``topic``, ``facts``, ``base_headline``."""
    unknown = sorted(set(users) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown user kind(s) {unknown}; known: {sorted(KINDS)}")
    if n_history < 0 or n_test < 0 or any(n < 0 for n in users.values()):
        raise ValueError("user counts, n_history and n_test must be >= 0")
    samples: list[Sample] = []
    seen: set[str] = set()
    for kind, (topics, preference_of) in KINDS.items():
        for u in range(users.get(kind, 0)):
            rng = random.Random(f"demo_style/user/{seed}/{kind}/{u}")
            user = f"style_{kind}_{u:02d}"
            pool = topics or TOPIC_NAMES
            # a topic user's history and test items are each half of each topic (one more
            # of the first for an odd count), in a shuffled order
            order: list[str] = []
            for n in (n_history, n_test):
                part = [pool[i % len(pool)] for i in range(n)]
                if topics:
                    rng.shuffle(part)
                order += part

            def draw(i: int, ts: int) -> tuple[str, str, dict[str, Any]]:
                weekday = WEEKDAYS[datetime.fromtimestamp(ts, tz=timezone.utc).weekday()]
                topic = order[i] if topics else rng.choice(pool)
                article, facts = distinct_article(rng, topic, weekday, seen)
                preference = preference_of.get(topic, preference_of.get("*", ""))
                meta = {"synthetic": True, "kind": kind, "preference": preference,
                        "topic": topic, "facts": facts, "base_headline": base_headline(facts)}
                return article, render(preference, facts, rng), meta

            day = EPOCH_START.timestamp() + rng.randint(0, 60) * DAY
            history: list[HistoryItem] = []
            for h in range(n_history):
                article, headline, meta = draw(h, int(day))
                history.append(HistoryItem(f"{user}-h{h:03d}", article, headline, int(day), meta))
                day += rng.randint(*GAP_DAYS) * DAY
            for q in range(n_test):
                article, headline, meta = draw(n_history + q, int(day))
                samples.append(Sample(id=f"{user}-q{q:03d}", user=user, input=PROMPT + article,
                                      target=headline, history=tuple(history),
                                      timestamp=int(day), meta=meta,
                                      type=sample_type(kind, meta["preference"])))
                day += rng.randint(*GAP_DAYS) * DAY
    return samples


def write_demo_style(samples: list[Sample], out_dir: str | Path) -> int:
    """The official LaMP-4 files and :data:`STYLES_FILE` beside them; returns the count."""
    q_path, _ = write_lamp_format(samples, out_dir)
    styles = {s.id: {k: s.meta[k] for k in ("kind", "preference", "topic")} for s in samples}
    (q_path.parent / STYLES_FILE).write_text(json.dumps(styles, indent=1) + "\n", encoding="utf-8")
    return len(samples)
