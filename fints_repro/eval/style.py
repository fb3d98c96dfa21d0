"""The style metric's lexicons and rules: is a headline casual, formal, positive, fluent?

Fixed here, before any result was looked at, and documented in docs/demo_style.md. A
headline is split into lower-cased words (letters, digits and inner apostrophes; curly
apostrophes read as straight ones).

- **casual**: it has a ``!``, or a word of :data:`CASUAL_WORDS` (slang and chatty
  interjections, informal contractions), or a phrase of :data:`CASUAL_PHRASES`.
- **formal**: not casual (no ``!`` and no casual word or phrase).
- **positive**: a word of :data:`POSITIVE_WORDS` and none of :data:`NEGATIVE_WORDS`.
- **degenerate** (the lexical half of the fluency guard): fewer than
  :data:`MIN_DISTINCT_WORDS` distinct words, one word at least :data:`MAX_REPEATS`
  times, or a run of three words twice (a looping generation: "it's just a reality, it's
  just a reality"). The other half (a per-token NLL under the unsteered model far above its own
  outputs') is the task's (fints_repro/tasks/text_style.py).

A prediction scores 1 for its sample's preference when it is fluent and has the
preference's property, else 0.
"""

from __future__ import annotations

import re
from collections import Counter

CASUAL_WORDS = frozenset({
    # slang and interjections
    "wow", "whoa", "woah", "yay", "omg", "lol", "hey", "oops", "yikes", "huh", "yep", "nope",
    "gonna", "wanna", "gotta", "kinda", "sorta", "folks", "guys", "y'all", "awesome", "cool",
    "totally", "super", "crazy", "epic", "insane", "huge", "ya", "dude", "buckle",
    # informal contractions
    "can't", "won't", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "it's",
    "that's", "here's", "what's", "there's", "who's", "let's", "they're", "we're", "you're",
    "i'm", "we've", "you've", "they've", "ain't", "'em",
})
CASUAL_PHRASES = ("no way", "guess what", "big time", "check out", "you won't believe")
POSITIVE_WORDS = frozenset({
    "great", "good", "win", "wins", "winning", "won", "success", "successful", "boost",
    "boosts", "celebrate", "celebrates", "celebrating", "celebration", "proud", "proudly",
    "bright", "welcome", "welcomes", "thrilled", "delighted", "excellent", "exciting",
    "triumph", "triumphant", "hope", "hopeful", "best", "cheer", "cheers", "joy", "happy",
    "praise", "praised", "positive", "wonderful", "fantastic", "amazing", "love", "loves",
    "beautiful", "brilliant", "milestone", "landmark", "historic", "record", "thriving",
    "stellar", "victory",
})
NEGATIVE_WORDS = frozenset({
    "bad", "crisis", "fail", "fails", "failed", "failure", "loss", "losses", "lose", "loses",
    "worst", "slump", "scandal", "fear", "fears", "chaos", "disaster", "blow", "setback",
    "angry", "anger", "outrage", "criticism", "criticized", "slammed", "decline", "plunge",
    "plunges", "threat", "threatens", "terrible", "awful", "sad", "grim", "worry", "worries",
    "concern", "concerns", "controversial", "controversy", "backlash", "problem", "problems",
    "danger", "dangerous", "shock", "shocking",
})
MIN_DISTINCT_WORDS = 3
MAX_REPEATS = 4

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|'em\b")


def words(text: str) -> list[str]:
    """Lower-cased words, curly apostrophes read as straight."""
    return _WORD.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def is_casual(text: str) -> bool:
    if "!" in text:
        return True
    ws = words(text)
    if CASUAL_WORDS.intersection(ws):
        return True
    joined = " ".join(ws)
    return any(re.search(rf"\b{p}\b", joined) for p in CASUAL_PHRASES)


def is_positive(text: str) -> bool:
    ws = set(words(text))
    return bool(ws & POSITIVE_WORDS) and not ws & NEGATIVE_WORDS


def is_degenerate(text: str) -> bool:
    ws = words(text)
    counts = Counter(ws)
    if len(counts) < MIN_DISTINCT_WORDS or max(counts.values()) >= MAX_REPEATS:
        return True
    trigrams = list(zip(ws, ws[1:], ws[2:]))
    return len(set(trigrams)) < len(trigrams)


def has_style(text: str, preference: str) -> bool:
    """Whether ``text`` has the property of ``preference`` (casual, formal, positive)."""
    if preference == "casual":
        return is_casual(text)
    if preference == "formal":
        return not is_casual(text)
    if preference == "positive":
        return is_positive(text)
    raise ValueError(f"unknown preference {preference!r}; known: casual, formal, positive")
