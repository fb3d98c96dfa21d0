"""Tiny random models for tests: any decoder-only architecture, built from a config.

They pair with a byte-level tokenizer made in code (256 byte tokens + chat specials), so
tests need no downloaded vocabulary. Weights are random but deterministic (seeded).
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 256 + len(SPECIALS)

# Small dimensions per architecture; anything else can be passed as arch_kwargs.
_BASE: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=16384),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=16384),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str, **overrides: Any):
    """The config of a tiny model (no weights): ``_BASE`` dimensions, the byte tokenizer's
    vocabulary, and a context of 16k positions unless ``overrides`` set one (a byte-level
    tokenizer makes long prompts; the prompt length check reads the context)."""
    if arch not in _BASE and not overrides:
        raise ValueError(f"no tiny defaults for arch {arch!r}; known: {sorted(_BASE)}")
    kwargs = {**_BASE.get(arch, {}), **overrides}
    if arch != "gpt2":  # GPT-2 names it n_positions
        kwargs.setdefault("max_position_embeddings", 16384)
    kwargs.update(
        vocab_size=VOCAB_SIZE,
        pad_token_id=SPECIALS.index("<|pad|>"),
        bos_token_id=SPECIALS.index("<|bos|>"),
        eos_token_id=SPECIALS.index("<|im_end|>"),
    )
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides: Any):
    tok = byte_tokenizer()
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, tok
