"""JSON objects inside arbitrary text, found in time linear in its length.

A model's output is data: whatever it writes (a tool call nested ten thousand levels deep,
a megabyte of ``{``, an unclosed code fence) must be read in bounded time and without an
exception. Trying ``json.JSONDecoder.raw_decode`` at every ``{`` does neither: it recurses
once per nesting level (``RecursionError`` past ~1000), and each failed attempt scans to
where it fails and builds an error message that counts the lines before it, so a text of
``{`` costs time quadratic in its length.

:class:`JsonScan` matches brackets instead, once for the whole text:

- the text is tokenised once into its brackets and quotes (one regular expression);
- a string opened at a quote ends at the next quote preceded by an even number of
  backslashes, found by bisection in the precomputed list of such quotes;
- the span of the object or array opened at a bracket is found with an explicit stack
  (no recursion) and memoised, so a bracket already matched while matching an enclosing
  one is never scanned again. A bracket's span is only ever computed in the one lexing
  in which it lies outside a string, so every token is visited once;
- an object is decoded (``json.loads`` of exactly its span) only when its brackets
  balance and it nests at most ``max_depth`` levels, so the decoder never recurses deeper
  than that; an object nested deeper is not read (a tool call nests four levels).

For a bracket whose span balances, ``json.loads`` of the span succeeds exactly when
``raw_decode`` at that bracket would, and gives the same value: for valid JSON the bracket
matching above is JSON's own. The objects come out in the order of their opening brace.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Any, Iterator

MAX_DEPTH = 32  # nesting levels an object may have to be decoded

_TOKEN = re.compile(r'[{}\[\]"]')
_QUOTE = re.compile(r'(\\*)"')
_FAIL = (-1, -1)  # a span that does not balance
_CLOSER = {"{": "}", "[": "]"}


class JsonScan:
    """The bracket structure of one text; see the module docstring."""

    def __init__(self, text: str, max_depth: int = MAX_DEPTH):
        self.text = text
        self.max_depth = max_depth
        self.pos = [m.start() for m in _TOKEN.finditer(text)]
        self.char = _TOKEN.findall(text)
        # quotes that can close a string: an even run of backslashes before them
        self.closers = [m.end() - 1 for m in _QUOTE.finditer(text) if len(m.group(1)) % 2 == 0]
        self.memo: dict[int, tuple[int, int]] = {}  # token index -> (end token index, height)

    def _string_end(self, i: int) -> int:
        """Token index of the quote that closes the string opened at token ``i``, or -1."""
        j = bisect.bisect_right(self.closers, self.pos[i])
        return self._token(self.closers[j]) if j < len(self.closers) else -1

    def _token(self, position: int) -> int:
        """Token index of the bracket or quote at character ``position``, or -1."""
        i = bisect.bisect_left(self.pos, position)
        return i if i < len(self.pos) and self.pos[i] == position else -1

    def span(self, i: int) -> tuple[int, int]:
        """(token index of the closing bracket, nesting height) of the value opened at
        token ``i``, or ``_FAIL`` when its brackets do not balance."""
        memo = self.memo
        if i in memo:
            return memo[i]
        char, n = self.char, len(self.char)
        stack = [[i, 1]]  # open bracket, height of what it holds so far
        j = i + 1
        while stack:
            if j >= n:
                for o, _ in stack:
                    memo[o] = _FAIL
                break
            c = char[j]
            if c == '"':
                j = self._string_end(j)
                if j < 0:
                    for o, _ in stack:
                        memo[o] = _FAIL
                    break
                j += 1
            elif c in _CLOSER:
                done = memo.get(j)
                if done is None:
                    stack.append([j, 1])
                    j += 1
                elif done is _FAIL:  # an invalid value inside: so is everything around it
                    for o, _ in stack:
                        memo[o] = _FAIL
                    break
                else:
                    top = stack[-1]
                    top[1] = max(top[1], done[1] + 1)
                    j = done[0] + 1
            else:  # a closing bracket
                o, height = stack.pop()
                if _CLOSER[char[o]] != c:
                    memo[o] = _FAIL
                    for o2, _ in stack:
                        memo[o2] = _FAIL
                    break
                memo[o] = (j, height)
                if stack:
                    stack[-1][1] = max(stack[-1][1], height + 1)
                j += 1
        return memo[i]

    def decode_at(self, position: int, end: int | None = None) -> Any:
        """The JSON value whose opening bracket is at character ``position`` (ending at
        character ``end``, inclusive, if given), or None: not a bracket, not balanced,
        nested deeper than ``max_depth``, or not valid JSON."""
        i = self._token(position)
        return None if i < 0 else self._decode(i, end)

    def _decode(self, i: int, end: int | None = None) -> Any:
        if self.char[i] not in _CLOSER:
            return None
        close, height = self.span(i)
        if close < 0 or height > self.max_depth:
            return None
        stop = self.pos[close]
        if end is not None and stop != end:
            return None
        try:
            return json.loads(self.text[self.pos[i]:stop + 1])
        except ValueError:  # json.JSONDecodeError, and a number too long to convert
            return None

    def whole(self, start: int = 0, stop: int | None = None) -> Any:
        """The value that is all of ``text[start:stop]`` but surrounding whitespace, or
        None (as ``json.loads`` of that stripped slice, for objects and arrays)."""
        part = self.text[start:stop]
        stripped = part.lstrip()
        if not stripped:
            return None
        start += len(part) - len(stripped)
        return self.decode_at(start, start + len(stripped.rstrip()) - 1)

    def objects(self) -> Iterator[Any]:
        """Every decodable object, in the order of its opening brace."""
        for i, c in enumerate(self.char):
            if c == "{":
                value = self._decode(i)
                if value is not None:
                    yield value


def fence_bodies(text: str) -> Iterator[tuple[int, int]]:
    """(start, stop) of the body of each closed ````` fence, an optional ``json`` /
    ``JSON`` tag after the opening backticks left out: the fences are the text between
    consecutive triple backticks, the first of each two opening (linear; a regular
    expression with a lazy body backtracks quadratically on an unclosed fence)."""
    start = text.find("```")
    while start >= 0:
        body = start + 3
        stop = text.find("```", body)
        if stop < 0:
            return
        if text.startswith(("json", "JSON"), body) and body + 4 <= stop:
            body += 4
        yield body, stop
        start = text.find("```", stop + 3)
