"""ROUGE-L F as the `rouge` package (PyPI ``rouge``, 1.0.1) computes it: the authors' pair
filter (``Rouge().get_scores(rejected, chosen)[0]['rouge-l']['f']`` in their
``data_collect_para.py``).

That package splits each text into sentences on ".", splits words on single spaces (no
lowercasing, punctuation stays on the word) and scores the summary-level union LCS, so it
differs from ``rouge_score`` (the LaMP convention: lowercased ``[a-z0-9]`` tokens, one
sequence) on a few percent of texts. The package is imported on first use.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator

from fints_repro.errors import ConfigError

# The most words a text may have to be scored (a generation of 1,024 new tokens has fewer).
MAX_WORDS = 2048


@functools.cache
def _scorer():
    try:
        from rouge import Rouge
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("steering.pairs.rouge_impl=rouge needs the `rouge` package: "
                          "pip install rouge==1.0.1") from e
    return Rouge(metrics=["rouge-l"], stats=["f"])


def _sentences(text: str) -> list[str]:
    """The package's split of a text (``Rouge._get_scores``): on ".", whitespace runs made
    single spaces; its words are these split on " "."""
    return [" ".join(s.split()) for s in text.split(".") if s]


@contextlib.contextmanager
def _recursion_room(depth: int) -> Iterator[None]:
    """``depth`` more levels of Python recursion than the caller has (pure-Python calls,
    which Python 3.11+ runs without the C stack), the limit as it was after."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(old + depth)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def rouge_l_f(hypothesis: str, reference: str) -> float | None:
    """F of ROUGE-L (summary level) of ``hypothesis`` against ``reference``; None where the
    package cannot score the texts: no sentence left after its split, or no word (it
    raises there, which stopped the authors' script), or more than ``MAX_WORDS`` words in
    a text.

    The package finds each LCS by a recursion one level per word of the two sentences
    compared, so a generation of 1,000 words without a "." exceeded Python's recursion
    limit; it runs here with room for the longest two sentences, and so gives its own
    result for any text up to ``MAX_WORDS`` words (its time grows with the product of
    the two texts' lengths)."""
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    lengths = [[len(s.split(" ")) for s in side] for side in (hyp, ref)]
    if not hyp or not ref or max(sum(n) for n in lengths) > MAX_WORDS:
        return None
    with _recursion_room(max(lengths[0]) + max(lengths[1]) + 50):
        try:
            return float(_scorer().get_scores(hypothesis, reference)[0]["rouge-l"]["f"])
        except (ValueError, ZeroDivisionError):
            return None
