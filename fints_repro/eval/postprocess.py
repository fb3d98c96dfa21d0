"""Post-processing of generated text before scoring.

``strip`` (the default everywhere) removes surrounding whitespace. ``fints_first_line``
is the Fints code's extra rule, offered as an option: keep the first line (split on
``"\\n"``) that is longer than one character, measured as the line stands, and that does
not contain "headline", "title" or "abstract"; the kept line is stripped. It follows the
authors' code (KounianhuaDu/Fints, evaluators/eval_lamp.py, first-line version): the
words are matched case-sensitively, and when no line qualifies the prediction is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fints_repro.registry import Registry

POSTPROCESS: Registry[Callable[[str], str]] = Registry("post-processing rule",
                                                      package="fints_repro.eval")

_HEADER_WORDS = ("headline", "title", "abstract")


@POSTPROCESS.register("strip")
def strip(text: str) -> str:
    """The text without leading and trailing whitespace."""
    return text.strip()


@POSTPROCESS.register("fints_first_line")
def fints_first_line(text: str) -> str:
    """The first line longer than one character that names no header word, stripped;
    "" when there is none (as in the authors' code)."""
    for line in text.split("\n"):
        if len(line) > 1 and not any(w in line for w in _HEADER_WORDS):
            return line.strip()
    return ""


def postprocess(texts: Iterable[str], mode: str) -> list[str]:
    """Apply the post-processing ``mode`` ("strip" or "fints_first_line") to each text."""
    if mode not in POSTPROCESS:
        raise ValueError(
            f"unknown post-processing mode {mode!r}; choose one of {POSTPROCESS.names()}"
        )
    fn = POSTPROCESS.get(mode)
    return [fn(t) for t in texts]
