"""Text that every later stage can take: valid Unicode.

A Python string may hold a lone surrogate (a code point in U+D800..U+DFFF), which no UTF-8
writer and no tokenizer accepts; JSON's ``"\\ud800"`` escape puts one into a string from
all-ASCII text. Where text from outside (a model's tool call, a data file) is decoded,
``valid_unicode`` replaces each one by U+FFFD, the replacement character.

Patterns from a config run on RE2 (``pattern``), whose matching time is linear in the text.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from fints_repro.errors import ConfigError

_SURROGATE = re.compile("[\ud800-\udfff]")
# Python's \s (str.isspace) as an RE2 class: RE2's own \s is [\t\n\f\r ] only.
WHITESPACE = r"[\t-\r\x1c-\x20\x85\p{Z}]"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def valid_unicode(text: str) -> str:
    """``text`` with each surrogate code point replaced by U+FFFD; ``text`` itself when
    it has none (the common case, checked at C speed)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def json_loads_valid(text: str) -> Any:
    """``json.loads(text)`` with every string in the result valid Unicode (``valid_unicode``),
    keys too; the walk only runs when the text escapes a surrogate (rare: a quick search)."""
    obj = json.loads(text)
    return valid_strings(obj) if _SURROGATE_ESCAPE.search(text) else obj


def valid_strings(obj: Any) -> Any:
    """A decoded JSON value with ``valid_unicode`` applied to every string in it, keys too."""
    if isinstance(obj, str):
        return valid_unicode(obj)
    if isinstance(obj, list):
        return [valid_strings(v) for v in obj]
    if isinstance(obj, dict):
        return {valid_unicode(k): valid_strings(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=64)
def pattern(regex: str, key: str, dotall: bool = False) -> Any:
    """``regex`` compiled by RE2 (google-re2), which matches in time linear in the text:
    the patterns a config applies to model output and data (``dataset.pair_answer_regex``,
    ``dataset.query_regex``) cannot backtrack for minutes on a crafted text, as Python's
    ``re`` does on an unclosed ``print("`` repeated. RE2's syntax is Python's without
    lookarounds and backreferences, and its ``\\s \\w \\d \\b`` are ASCII-only (``WHITESPACE``
    is Python's ``\\s``); a pattern it cannot compile is a ConfigError naming ``key``.
    ``dotall``: ``.`` matches a newline too (``re.S``)."""
    import re2

    options = re2.Options()
    options.log_errors = False
    options.dot_nl = dotall
    try:
        return re2.compile(regex, options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        raise ConfigError(f"{key}={regex!r}: not a pattern RE2 can run ({why}); patterns are "
                          "Python's re syntax without lookarounds and backreferences") from e


def search(regex: Any, text: str) -> Any:
    """``regex.search`` (a compiled ``pattern``) on ``text`` made valid Unicode (RE2 reads
    UTF-8): the match or None."""
    return regex.search(valid_unicode(text))
