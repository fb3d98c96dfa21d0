"""Chat rendering: the tokenizer's own chat template, or the plain text where it has none."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


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
