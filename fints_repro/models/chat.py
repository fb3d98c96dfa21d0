"""Chat rendering: the tokenizer's own chat template, or the plain text where it has none."""

from __future__ import annotations

from typing import Callable, Sequence

from transformers import PreTrainedTokenizerBase

OVERLENGTH = ("error", "truncate")


def render_chat(tok: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None = None) -> str:
    if not getattr(tok, "chat_template", None):
        return user_text if system_prompt is None else f"{system_prompt}\n\n{user_text}"
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_text})
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


TRUNCATION_MARK = " [...] "


def fit_user_text(tok: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None,
                  budget: int) -> tuple[str, int]:
    """``user_text`` cut so that its rendered chat prompt has at most ``budget`` tokens:
    tokens are dropped from the middle (marked ``TRUNCATION_MARK``), keeping the start and
    the end of the turn, where instructions and the task input sit in every template.
    Returns the text and the rendered prompt's token count."""
    n = len(tok(render_chat(tok, user_text, system_prompt), add_special_tokens=False)["input_ids"])
    if n <= budget:
        return user_text, n
    ids = tok(user_text, add_special_tokens=False)["input_ids"]
    overhead = n - len(ids)
    mark = len(tok(TRUNCATION_MARK, add_special_tokens=False)["input_ids"])
    keep = budget - overhead - mark
    while keep > 0:
        head, tail = ids[: (keep + 1) // 2], ids[len(ids) - keep // 2:] if keep // 2 else []
        text = tok.decode(head) + TRUNCATION_MARK + tok.decode(tail)
        n = len(tok(render_chat(tok, text, system_prompt), add_special_tokens=False)["input_ids"])
        if n <= budget:  # re-tokenising at the seams can merge or split a token or two
            return text, n
        keep -= max(1, n - budget)
    raise ValueError(f"the chat template alone needs {overhead} of the {budget} tokens")


def clip_chat_prompts(tok: PreTrainedTokenizerBase, user_texts: Sequence[str],
                     system_prompt: str | None, limit: int | None, max_new_tokens: int,
                     overlength: str, describe: Callable[[int, int], Exception],
                     ) -> tuple[list[str], list[int]]:
    """The chat-rendered prompts, each checked against the context ``limit`` (None: no
    limit) with room for ``max_new_tokens``. A prompt too long stops with the error
    ``describe(index, n_tokens)`` (``overlength="error"``; also when nothing would fit) or
    has its user turn cut in the middle (``"truncate"``). Returns the texts and the
    indices of those cut, before any model time."""
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength={overlength!r}; expected one of {list(OVERLENGTH)}")
    texts = [render_chat(tok, t, system_prompt) for t in user_texts]
    if limit is None or not texts:
        return texts, []
    budget = limit - max_new_tokens
    lengths = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > budget]
    if over and (overlength == "error" or budget <= 0):
        raise describe(over[0], lengths[over[0]])
    for i in over:
        text, _ = fit_user_text(tok, user_texts[i], system_prompt, budget)
        texts[i] = render_chat(tok, text, system_prompt)
    return texts, over


def clip_token_sequence(ids: list[int], start: int, limit: int | None) -> tuple[list[int], int] | None:
    """A question + answer token sequence (answer from ``start``) cut to ``limit`` tokens
    by dropping question tokens from its middle, the answer kept whole; ``(ids, start)``
    unchanged when it fits, None when the answer alone (plus one question token) does not."""
    if limit is None or len(ids) <= limit:
        return ids, start
    answer = ids[start:]
    keep = limit - len(answer)
    if keep < 1:
        return None
    question = ids[:start]
    head, tail = question[: (keep + 1) // 2], question[len(question) - keep // 2:] if keep // 2 else []
    return head + tail + answer, len(head) + len(tail)
