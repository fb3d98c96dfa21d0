"""ROUGE-L F as the `rouge` package (PyPI ``rouge``, 1.0.1) computes it: the authors' pair
filter (``Rouge().get_scores(rejected, chosen)[0]['rouge-l']['f']`` in their
``data_collect_para.py``).

That package splits each text into sentences on ".", splits words on single spaces (no
lowercasing, punctuation stays on the word) and scores the summary-level union LCS, so it
differs from ``rouge_score`` (the LaMP convention: lowercased ``[a-z0-9]`` tokens, one
sequence) on a few percent of texts. The package is imported on first use.
"""

from __future__ import annotations

import functools

from fints_repro.errors import ConfigError


@functools.cache
def _scorer():
    try:
        from rouge import Rouge
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("steering.pairs.rouge_impl=rouge needs the `rouge` package: "
                          "pip install rouge==1.0.1") from e
    return Rouge(metrics=["rouge-l"], stats=["f"])


def rouge_l_f(hypothesis: str, reference: str) -> float | None:
    """F of ROUGE-L (summary level) of ``hypothesis`` against ``reference``; None where the
    package cannot score the texts (no sentence left after its split, or no word: it
    raises there, which stopped the authors' script)."""
    try:
        return float(_scorer().get_scores(hypothesis, reference)[0]["rouge-l"]["f"])
    except (ValueError, ZeroDivisionError):
        return None
