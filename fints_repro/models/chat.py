"""Chat rendering: the tokenizer's own chat template, or the plain text where it has none."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def render_chat(tok: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None = None) -> str:
    if not getattr(tok, "chat_template", None):
        return user_text if system_prompt is None else f"{system_prompt}\n\n{user_text}"
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_text})
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
