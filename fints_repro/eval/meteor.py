"""METEOR with NLTK, by the convention of the LongLaMP evaluation.

NLTK's ``meteor_score`` with alpha 0.9, beta 3, gamma 0.5, one reference per prediction,
mean over samples. Text is lowercased (meteor's ``preprocess``) and tokenized without
NLTK data: an untrained ``PunktSentenceTokenizer`` splits sentences (so sentence-final
periods become tokens, as with ``word_tokenize``) and ``NLTKWordTokenizer`` splits words.
Unlike ``word_tokenize`` with the trained English punkt model, abbreviations are not
known, so ``"e.g."`` splits into ``"e.g", "."``.

Matching stages: exact, then Porter stem, then WordNet synonyms, the last only where
NLTK's wordnet corpus is installed; otherwise a stand-in with no synonyms is used. The
stages used are reported as ``meteor_matching``. The score is deterministic: no sampling,
and the alignment depends only on the token sequences.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nltk.stem.porter import PorterStemmer
from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer
from nltk.translate.meteor_score import meteor_score

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5

_SENTENCES = PunktSentenceTokenizer()
_WORDS = NLTKWordTokenizer()
_STEMMER = PorterStemmer()


class _NoSynonyms:
    """Stand-in for ``nltk.corpus.wordnet`` when its data is missing: no synsets at all."""

    def synsets(self, lemma: str) -> list[Any]:
        return []


@functools.cache
def wordnet_matcher() -> tuple[Any, str]:
    """The wordnet object meteor gets and the matching stages it implies (once per process)."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return _NoSynonyms(), "exact+stem"
    return wordnet, "exact+stem+wordnet"


def tokenize(text: str) -> list[str]:
    """Sentence-split, then word-tokenize, with no NLTK data (case is kept; meteor lowercases)."""
    return [w for s in _SENTENCES.tokenize(text) for w in _WORDS.tokenize(s)]


@dataclass(frozen=True)
class MeteorResult:
    """Per-sample METEOR and the aggregate (``meteor`` mean, ``meteor_matching`` stages)."""

    scores: list[float]
    aggregate: dict[str, float | str]


def meteor(predictions: Sequence[str], references: Sequence[str]) -> MeteorResult:
    """METEOR of each prediction against its reference. ValueError on a length mismatch or
    an empty list."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    if not predictions:
        raise ValueError("meteor needs at least one prediction")
    wordnet, matching = wordnet_matcher()
    scores = [
        float(
            meteor_score(
                [tokenize(ref)],
                tokenize(pred),
                preprocess=str.lower,
                stemmer=_STEMMER,
                wordnet=wordnet,
                alpha=ALPHA,
                beta=BETA,
                gamma=GAMMA,
            )
        )
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return MeteorResult(
        scores=scores,
        aggregate={"meteor": sum(scores) / len(scores), "meteor_matching": matching},
    )
