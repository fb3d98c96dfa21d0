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


import pytest
import torch

from fints_repro.models.tiny import tiny_model
from fints_repro.steering.hooks import capture, steer
from fints_repro.steering.sites import (
    PRE_MLP_NORM_NAMES,
    SteeringError,
    decoder_layers,
    default_layer,
    hidden_size,
    layers_owner,
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
    """generate() kwargs for a KV cache kind of transformers': its default (dynamic) or its
    static cache (the model gets a prepared 4-D mask, per attention type for Qwen2)."""
    return {"dynamic": {}, "static": {"cache_implementation": "static"}}[cache]


@pytest.mark.parametrize(("arch", "cache"), [("llama", "dynamic"), ("gpt2", "dynamic"),
                                             ("llama", "static"), ("qwen2", "static")])
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


# --- the module the bookkeeping pre-hook sits on ----------------------------------------


@pytest.mark.parametrize(("arch", "path"), [("llama", "model"), ("gpt2", "transformer"),
                                            ("opt", "model.decoder"), ("gpt_neox", "gpt_neox")])
def test_layers_owner_is_the_parent_of_the_decoder_layers(arch: str, path: str) -> None:
    model, _ = _model(arch)
    owner = layers_owner(model)
    assert owner is model.get_submodule(path)
    assert any(child is decoder_layers(model) for child in owner.children())


def test_a_site_run_outside_any_forward_call_fails_loudly() -> None:
    model, _ = _model("llama")
    mlp = site_module(model, 1, "mlp")
    with pytest.raises(SteeringError, match="no forward call"):
        with torch.no_grad(), steer(model, {(1, "mlp"): torch.ones(64)}):
            mlp(torch.zeros(1, 2, 64))
    assert _hooks_count(model) == 0


# --- position masks and weights ---------------------------------------------------------


def _weights(enc, seed: int, extra: int = 0) -> torch.Tensor:
    """Random real weights [B, T + extra] with some exact zeros and non-zero at the pads."""
    B, T = enc["input_ids"].shape
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, T + extra, generator=g) * 3 - 1
    w[torch.rand(B, T + extra, generator=g) < 0.25] = 0.0
    return w


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_position_weights_equal_recomputation_by_hand(arch: str) -> None:
    model, tok = _model(arch)
    enc = _batch(tok)
    H = hidden_size(model)
    v = torch.randn(len(PROMPTS), H, generator=torch.Generator().manual_seed(3))
    w = _weights(enc, 4)
    not_pad = enc["attention_mask"].bool()
    pad = ~not_pad
    assert pad.any() and (w[pad] != 0).any() and (w[not_pad] == 0).any()
    block = decoder_layers(model)[LAYER]
    with torch.no_grad():
        with capture(model, [(LAYER - 1, "resid"), (LAYER, "attn"), (LAYER, "resid")]) as acts:
            model(**enc)
        x, a, ref = acts[(LAYER - 1, "resid")], acts[(LAYER, "attn")], acts[(LAYER, "resid")]
        mlp, norm = site_module(model, LAYER, "mlp"), _pre_mlp_norm(block)
        h1 = x + a + (w * not_pad)[..., None] * v[:, None, :]  # pads: weight 0
        expected = h1 + mlp(norm(h1))
        with steer(model, {(LAYER, "attn"): v}, positions=w), capture(model, [(LAYER, "resid")]) as got:
            model(**enc)
    b = got[(LAYER, "resid")]
    torch.testing.assert_close(b[not_pad], expected[not_pad], rtol=1e-5, atol=1e-5)
    assert torch.equal(b[pad], ref[pad])  # pad positions never change
    zero = not_pad & (w == 0)
    torch.testing.assert_close(b[zero], ref[zero], rtol=1e-6, atol=1e-6)  # weight 0: not steered
    assert (b[not_pad & (w != 0)] - ref[not_pad & (w != 0)]).abs().max() > 1e-2


def test_bool_mask_equals_0_1_weights_and_all_true_equals_all() -> None:
    model, tok = _model("llama")
    enc = _batch(tok)
    v = torch.randn(64, generator=torch.Generator().manual_seed(5))
    flags = _weights(enc, 6) > 0.5
    vecs = {(LAYER, "attn"): v, (1, "mlp"): -v}
    with torch.no_grad():
        with steer(model, vecs, positions=flags):
            by_bool = model(**enc).logits
        with steer(model, vecs, positions=flags.double()):  # cast to the model's dtype
            by_float = model(**enc).logits
        with steer(model, vecs, positions=flags[:1].expand(3, -1).clone()):
            by_first_row = model(**enc).logits
        with steer(model, vecs, positions=flags[:1]):  # one row for every row
            by_one_row = model(**enc).logits
        with steer(model, vecs, positions=torch.ones_like(flags)):
            all_true = model(**enc).logits
        with steer(model, vecs, positions="all"):
            all_str = model(**enc).logits
        plain = model(**enc).logits
    assert torch.equal(by_bool, by_float)
    assert torch.equal(by_one_row, by_first_row)
    assert torch.equal(all_true, all_str)
    assert not torch.equal(by_bool, all_str) and not torch.equal(by_bool, plain)


def _reference_generate_weighted(model, prompt: str, tok, v: torch.Tensor, w: torch.Tensor,
                                 n: int) -> list[int]:
    """Greedy decoding without a KV cache, adding w[j] * v at position j of the unpadded
    sequence (the attention output of LAYER)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + v * w[: h.shape[1], None].to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = site_module(model, LAYER, "attn").register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    finally:
        handle.remove()
    return ids[n_prompt:]


@pytest.mark.parametrize(("arch", "cache"), [("llama", "dynamic"), ("gpt2", "dynamic"),
                                             ("llama", "static"), ("qwen2", "static")])
def test_position_weights_under_the_kv_cache_are_indexed_by_absolute_position(
        arch: str, cache: str) -> None:
    model, tok = _model(arch)
    enc = _batch(tok)
    n = 6
    H = hidden_size(model)
    v = torch.randn(len(PROMPTS), H, generator=torch.Generator().manual_seed(7)) * 4.0
    w = _weights(enc, 8, extra=n)  # the prompt and every generated token
    with torch.no_grad(), steer(model, {(LAYER, "attn"): v}, positions=w):
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, **_cache_kwargs(model, cache))
    got = out[:, enc["input_ids"].shape[1]:].tolist()
    n_pad = (1 - enc["attention_mask"]).sum(1).tolist()
    want = [_reference_generate_weighted(model, p, tok, v[i], w[i, n_pad[i]:], n)
            for i, p in enumerate(PROMPTS)]
    assert got == want
    unsteered = [_reference_generate_weighted(model, p, tok, v[i] * 0, w[i, n_pad[i]:], n)
                 for i, p in enumerate(PROMPTS)]
    assert got != unsteered


def test_bad_position_masks_fail_loudly() -> None:
    model, tok = _model("llama")
    enc = _batch(tok)
    B, T = enc["input_ids"].shape
    vec = {(1, "attn"): torch.zeros(64)}
    with pytest.raises(SteeringError, match="covers positions 0..%d" % (T - 1)):
        with torch.no_grad(), steer(model, vec, positions=torch.ones(B, T)):
            model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    with pytest.raises(SteeringError, match="covers positions 0..%d" % (T - 2)):
        with torch.no_grad(), steer(model, vec, positions=torch.ones(B, T - 1)):
            model(**enc)
    with pytest.raises(SteeringError, match="2 rows"):
        with torch.no_grad(), steer(model, vec, positions=torch.ones(2, T)):
            model(**enc)
    for bad, match in [(torch.ones(T), "expected \\[batch, seq_len\\]"),
                       (torch.ones(B, T, 1), "expected \\[batch, seq_len\\]"),
                       (torch.full((B, T), float("nan")), "NaN")]:
        with pytest.raises(SteeringError, match=match):
            with steer(model, vec, positions=bad):
                pass
    assert _hooks_count(model) == 0


# --- vectors that keep their gradient ---------------------------------------------------


def _float64_llama():
    model, tok = _model("llama")
    return model.to(torch.float64), tok


@pytest.mark.parametrize("vector_dtype", [torch.float64, torch.float32])
def test_vector_gradient_equals_autograd_on_a_hand_written_forward(vector_dtype) -> None:
    """Steering the last layer's output: logits = lm_head(norm(h + w·v)). The gradient
    that flows through steer() equals autograd on that forward written here, for the
    vector (also when it must be cast to the model's dtype) and for real position
    weights that require grad."""
    model, tok = _float64_llama()
    enc = _batch(tok)
    last = len(decoder_layers(model)) - 1
    g = torch.Generator().manual_seed(9)
    v0 = torch.randn(len(PROMPTS), 64, generator=g, dtype=torch.float64).to(vector_dtype)
    w0 = _weights(enc, 10).to(torch.float64)
    target = torch.randn(len(PROMPTS), enc["input_ids"].shape[1], model.config.vocab_size,
                         generator=g, dtype=torch.float64)
    not_pad = enc["attention_mask"].bool()

    def loss_of(logits):
        return ((logits - target) ** 2)[not_pad].mean()

    v, w = v0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    with steer(model, {(last, "resid"): v}, positions=w):
        loss = loss_of(model(**enc).logits)
    loss.backward()

    with torch.no_grad(), capture(model, [(last, "resid")]) as acts:
        model(**enc)
    h = acts[(last, "resid")]
    v_ref, w_ref = v0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    steered = h + (w_ref * not_pad)[..., None] * v_ref.to(torch.float64)[:, None, :]
    loss_ref = loss_of(model.lm_head(model.model.norm(steered)))
    loss_ref.backward()

    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert v.grad is not None and v.grad.dtype == vector_dtype and v.grad.abs().max() > 0
    torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(w.grad[~not_pad], torch.zeros_like(w.grad[~not_pad]))  # pads: no effect


def test_vector_gradient_through_later_layers_matches_finite_differences() -> None:
    """Steering a mid layer's attention output: the gradient through every later layer
    equals central finite differences (torch.autograd.gradcheck). GPT-2, whose float64
    forward stays float64 (Llama's RMSNorm and rotary run in float32)."""
    model, tok = _model("gpt2")
    model = model.to(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    enc = tok(["ab cd", "x"], return_tensors="pt", padding=True, add_special_tokens=False)
    v = torch.randn(64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    v.requires_grad_(True)

    def f(vec):
        with steer(model, {(1, "attn"): vec}, positions="prompt"):
            return model(**enc).logits[:, -1, :6]

    assert torch.autograd.gradcheck(f, (v,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_vector_without_grad_steers_exactly_as_before() -> None:
    """A vector that does not require grad is detached (no grad reaches it) and the
    output is bit-identical to a plain hook adding it at the non-pad positions; a vector
    that requires grad gives bit-identical outputs too."""
    model, tok = _model("llama")
    enc = _batch(tok)
    v = torch.randn(len(PROMPTS), 64, generator=torch.Generator().manual_seed(12))
    not_pad = enc["attention_mask"].bool()

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + v[:, None, :] * not_pad[..., None].to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = site_module(model, LAYER, "mlp").register_forward_hook(hook)
    try:
        by_hand = model(**enc).logits
    finally:
        handle.remove()
    with steer(model, {(LAYER, "mlp"): v}):
        plain = model(**enc).logits
    vg = v.clone().requires_grad_(True)
    with steer(model, {(LAYER, "mlp"): vg}):
        with_grad = model(**enc).logits
    assert torch.equal(plain, by_hand) and torch.equal(with_grad, by_hand)
    plain.sum().backward()
    assert v.grad is None and not v.requires_grad
    with_grad.sum().backward()
    assert vg.grad is not None and vg.grad.abs().max() > 0
