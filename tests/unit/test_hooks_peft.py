"""steer() and capture() on a PEFT-wrapped model equal the same on the model with the
adapter merged into its weights.

``PeftModelForCausalLM.generate`` calls the wrapped model's ``generate``, never the
wrapper's own forward: a bookkeeping pre-hook on the wrapper would never fire, so
``positions="prompt"``/``"generated"`` would be ignored and left pads steered. The hooks
sit on the module that runs the decoder layers instead (``sites.layers_owner``).

LoRA weights are random and non-zero (``init_lora_weights=False``), so the adapter changes
the outputs; the models run in float64 so that merged and unmerged LoRA agree to ~1e-12.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from fints_repro.models.tiny import tiny_model  # noqa: E402
from fints_repro.steering.hooks import capture, steer  # noqa: E402
from fints_repro.steering.sites import decoder_layers, layers_owner  # noqa: E402

PROMPTS = ["the quick brown fox jumps", "hi", "a medium sized prompt here"]
LAYER = 2
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
N_NEW = 5


def _plain(arch: str):
    model, tok = tiny_model(arch)
    tok.padding_side = "left"
    return model.to(torch.float64), tok


def _wrapped(arch: str):
    model, tok = _plain(arch)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=TARGETS[arch],
                          init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(model, cfg)
    wrapped.eval()
    return wrapped, tok


def _merged(arch: str):
    wrapped, _ = _wrapped(arch)  # the same seeds: the same LoRA weights
    return wrapped.merge_and_unload()


def _batch(tok):
    return tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)


def _vectors(model) -> dict:
    g = torch.Generator().manual_seed(0)
    H = model.config.hidden_size
    return {(LAYER, "attn"): torch.randn(len(PROMPTS), H, generator=g, dtype=torch.float64) * 4,
            (1, "mlp"): torch.randn(H, generator=g, dtype=torch.float64) * 2}


def _hooks_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _generate(model, tok, enc, vectors, positions):
    with torch.no_grad(), steer(model, vectors, positions=positions):
        out = model.generate(**enc, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=tok.pad_token_id, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences[:, enc["input_ids"].shape[1]:].tolist(), torch.stack(out.scores)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request):
    arch = request.param
    wrapped, tok = _wrapped(arch)
    merged = _merged(arch)
    plain, _ = _plain(arch)
    enc = _batch(tok)
    with torch.no_grad():  # the adapter changes the outputs
        assert (wrapped(**enc).logits - plain(**enc).logits).abs().max() > 1e-2
        torch.testing.assert_close(wrapped(**enc).logits, merged(**enc).logits,
                                   rtol=1e-10, atol=1e-10)
    return wrapped, merged, tok


def test_the_pre_hook_goes_on_the_module_that_runs_the_layers(models) -> None:
    wrapped, merged, _ = models
    inner = wrapped.get_base_model()
    assert type(wrapped).__name__ == "PeftModelForCausalLM"
    base = inner.model if hasattr(inner, "model") else inner.transformer
    assert layers_owner(wrapped) is base and decoder_layers(wrapped) is decoder_layers(inner)
    assert layers_owner(merged) is not base
    with steer(wrapped, _vectors(wrapped), positions="prompt"):
        assert len(base._forward_pre_hooks) == 1 and len(wrapped._forward_pre_hooks) == 0
    assert _hooks_count(wrapped) == 0


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_generate_through_the_wrapper_equals_the_merged_model(models, positions: str) -> None:
    """Left padding, per-row vectors, the KV cache: the same greedy tokens and scores."""
    wrapped, merged, tok = models
    enc = _batch(tok)
    vectors = _vectors(wrapped)
    got, got_scores = _generate(wrapped, tok, enc, vectors, positions)
    want, want_scores = _generate(merged, tok, enc, vectors, positions)
    assert got == want
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-9, atol=1e-9)
    unsteered, _ = _generate(merged, tok, enc, {}, "all")
    assert got != unsteered
    assert _hooks_count(wrapped) == 0


def test_positions_take_effect_through_the_wrapper(models) -> None:
    """With the pre-hook on the wrapper (never called by generate) every mode would steer
    every position; here each mode gives different scores. (Scores, not tokens: a random
    tiny GPT-2 repeats one token whatever is added to it.) ``prompt`` and ``all`` steer the
    same positions up to the first new token, so their first step agrees and a later one
    does not; ``generated`` leaves the prompt alone, so its first step is unsteered."""
    wrapped, _, tok = models
    enc = _batch(tok)
    vectors = _vectors(wrapped)
    scores = {p: _generate(wrapped, tok, enc, vectors, p)[1]
              for p in ("all", "prompt", "generated")}
    _, scores["none"] = _generate(wrapped, tok, enc, {}, "all")
    torch.testing.assert_close(scores["prompt"][0], scores["all"][0], rtol=1e-9, atol=1e-9)
    assert _max_diff(scores["prompt"][1:], scores["all"][1:]) > 1e-3
    torch.testing.assert_close(scores["generated"][0], scores["none"][0], rtol=1e-9, atol=1e-9)
    assert _max_diff(scores["generated"][1:], scores["all"][1:]) > 1e-3
    assert _max_diff(scores["generated"][1:], scores["none"][1:]) > 1e-3


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Over the finite scores (min_new_tokens puts -inf on EOS in both)."""
    finite = torch.isfinite(a) & torch.isfinite(b)
    return float((a - b)[finite].abs().max())


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "mask"])
def test_forward_through_the_wrapper_equals_the_merged_model(models, positions: str) -> None:
    """One forward pass with left padding: the same logits, pads never changed, and
    ``generated`` (no generated token in a single pass) steers nothing."""
    wrapped, merged, tok = models
    enc = _batch(tok)
    vectors = {(LAYER, "attn"): _vectors(wrapped)[(LAYER, "attn")]}  # its input: unsteered
    pos = positions
    if positions == "mask":  # real weights per position, non-zero at the pads too
        pos = torch.rand(enc["input_ids"].shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) + 0.5
    not_pad = enc["attention_mask"].bool()
    with torch.no_grad():
        plain = wrapped(**enc).logits
        with capture(wrapped, [(LAYER, "attn")]) as ref:
            wrapped(**enc)
        with steer(wrapped, vectors, positions=pos), capture(wrapped, [(LAYER, "attn")]) as acts:
            got = wrapped(**enc).logits
        with steer(merged, vectors, positions=pos):
            want = merged(**enc).logits
    torch.testing.assert_close(got[not_pad], want[not_pad], rtol=1e-9, atol=1e-9)
    a, b = ref[(LAYER, "attn")], acts[(LAYER, "attn")]
    assert a.shape[:2] == enc["input_ids"].shape
    assert torch.equal(a[~not_pad], b[~not_pad])  # pad positions never change
    if positions == "generated":
        assert torch.equal(got, plain)
    else:
        assert (got - plain)[not_pad].abs().max() > 1e-2
        weight = pos[not_pad][:, None] if positions == "mask" else 1.0
        v = vectors[(LAYER, "attn")][:, None, :].expand_as(b)[not_pad]
        torch.testing.assert_close(b[not_pad], a[not_pad] + weight * v, rtol=1e-12, atol=1e-12)
    assert _hooks_count(wrapped) == 0


def test_capture_through_the_wrapper_equals_the_merged_model(models) -> None:
    wrapped, merged, tok = models
    enc = _batch(tok)
    sites = [(1, "attn"), (LAYER, "mlp"), (LAYER, "resid")]
    with torch.no_grad():
        with capture(wrapped, sites) as got:
            wrapped(**enc)
        with capture(merged, sites) as want:
            merged(**enc)
        with capture(wrapped, sites, stop_early=True) as early:
            wrapped(**enc)
    for key in sites:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-10)
        assert torch.equal(early[key], got[key])
    assert _hooks_count(wrapped) == 0


def test_gradient_reaches_the_vector_through_the_wrapper(models) -> None:
    """A vector that requires grad, steered through the PEFT model (LoRA weights trainable
    too): its gradient equals the one through the merged model."""
    wrapped, merged, tok = models
    enc = _batch(tok)
    not_pad = enc["attention_mask"].bool()
    grads = []
    for model in (wrapped, merged):
        v = _vectors(wrapped)[(LAYER, "attn")].clone().requires_grad_(True)
        even = not_pad & (torch.arange(not_pad.shape[1]) % 2 == 0)
        with steer(model, {(LAYER, "attn"): v}, positions=even):
            model(**enc).logits[not_pad].logsumexp(-1).sum().backward()
        grads.append(v.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    wrapped.zero_grad(set_to_none=True)
    merged.zero_grad(set_to_none=True)
