"""BiPO (steering=bipo): the loss and its gradient against a hand-written reference on a
tiny model, training that raises a marker's log-probability, the method through the
pipeline (cached, its loss curve reported), and bad settings caught at start-up."""

from __future__ import annotations


import pytest
import torch

from fints_repro.preferences.pairs import Pair
from fints_repro.steering.extract import pad_batch
from fints_repro.steering.logprob import packed, sequence_logprobs
from fints_repro.steering.methods.bipo import BiPOSettings, _reference, bipo_loss, train_vector
from fints_repro.steering.sites import decoder_layers
from tests.conftest import assert_config_error


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from fints_repro.compose import compose_run
    from fints_repro.models.loading import load_model

    cache = tmp_path_factory.mktemp("cache")
    cfg = compose_run(["model=tiny_random_llama", f"cache_dir={cache}"])
    return load_model(cfg.model, str(cache))


PAIRS = [Pair("u", "a", "Write a title for the article about rain", "Rain again today", "Weather news", 0.0, 0),
         Pair("u", "b", "Write a title", "Markets fall sharply in the morning", "Stocks", 0.0, 0),
         Pair("u", "c", "Sum up: the team won the cup final", "Cup glory", "Team wins the final match at home", 0.0, 0)]


def _logp_one(model, tok, q, a, hook=None):
    """log p(a | q) for one unpadded sequence, by hand: the question's tokens (with the
    tokenizer's special tokens), then " " + a's tokens; log-softmax of the logits at the
    position before each answer token."""
    q_ids = tok(q)["input_ids"]
    a_ids = tok(" " + a, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([q_ids + a_ids])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(q_ids) + j - 1, t] for j, t in enumerate(a_ids))


def test_loss_and_gradient_equal_a_hand_written_reference(lm) -> None:
    model, tok, layer, beta = lm.model, lm.tokenizer, 1, 0.1
    torch.manual_seed(0)
    H = model.config.hidden_size
    for d in (-1.0, 1.0):
        v = (0.5 * torch.randn(H)).requires_grad_(True)
        pad = tok.pad_token_id
        w = packed(lm, [p.prompt for p in PAIRS], [p.chosen for p in PAIRS])
        lo = packed(lm, [p.prompt for p in PAIRS], [p.rejected for p in PAIRS])
        rows = [0, 1, 2]
        loss = bipo_loss(model, layer, v, d, beta, pad_batch(w, rows, pad), pad_batch(lo, rows, pad),
                         _reference(model, w, pad, 2), _reference(model, lo, pad, 2))
        (grad,) = torch.autograd.grad(loss, [v])

        # the reference: a plain forward hook adding d * v to the block's output, one
        # sequence at a time, no padding
        v2 = v.detach().clone().requires_grad_(True)

        def add(mod, args, out):
            return (out[0] + d * v2,) + tuple(out[1:]) if isinstance(out, tuple) else out + d * v2

        layer_mod = decoder_layers(model)[layer]
        terms = []
        for p in PAIRS:
            with torch.no_grad():
                rw, rl = _logp_one(model, tok, p.prompt, p.chosen), _logp_one(model, tok, p.prompt, p.rejected)
            h = layer_mod.register_forward_hook(add)
            try:
                pw, pl = _logp_one(model, tok, p.prompt, p.chosen), _logp_one(model, tok, p.prompt, p.rejected)
            finally:
                h.remove()
            terms.append(-torch.nn.functional.logsigmoid(d * beta * ((pw - rw) - (pl - rl))))
        want = torch.stack(terms).mean()
        (want_grad,) = torch.autograd.grad(want, [v2])
        assert loss.item() == pytest.approx(want.item(), abs=1e-5)
        assert torch.allclose(grad, want_grad, rtol=1e-3, atol=1e-6), (grad - want_grad).abs().max()
        assert grad.abs().sum() > 0
    # no vector: the loss is log 2 whatever d
    zero = torch.zeros(H, requires_grad=True)
    w = packed(lm, [PAIRS[0].prompt], [PAIRS[0].chosen])
    lo = packed(lm, [PAIRS[0].prompt], [PAIRS[0].rejected])
    ref = (_reference(model, w, tok.pad_token_id, 1), _reference(model, lo, tok.pad_token_id, 1))
    z = bipo_loss(model, 1, zero, 1.0, beta, pad_batch(w, [0], tok.pad_token_id),
                  pad_batch(lo, [0], tok.pad_token_id), *ref)
    assert z.item() == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_with_eos_the_loss_is_their_formula_over_the_answer_and_its_eos(lm) -> None:
    """Their trainer appends the EOS to both answers: the loss, recomputed by hand with
    log p(EOS | question, answer) added to each side, is the batched one to float
    precision, and train_vector's first loss (the vector still zero: log 2) runs on it."""
    from fints_repro.steering.methods.bipo import with_eos

    model, tok, layer, beta, d = lm.model, lm.tokenizer, 1, 0.1, -1.0
    torch.manual_seed(1)
    v = (0.5 * torch.randn(model.config.hidden_size)).requires_grad_(True)
    pad, rows = tok.pad_token_id, [0, 1, 2]
    w = with_eos(packed(lm, [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]), tok)
    lo = with_eos(packed(lm, [p.prompt for p in PAIRS], [p.rejected for p in PAIRS]), tok)
    assert all(ids[-1] == tok.eos_token_id for ids, _ in w + lo)
    assert with_eos(w, tok) == w  # an answer that ends with the EOS gets no second one
    loss = bipo_loss(model, layer, v, d, beta, pad_batch(w, rows, pad), pad_batch(lo, rows, pad),
                     _reference(model, w, pad, 2), _reference(model, lo, pad, 2))

    def logp(q, a, hook=None):
        q_ids = tok(q)["input_ids"]
        a_ids = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        h = decoder_layers(model)[layer].register_forward_hook(hook) if hook else None
        try:
            lp = torch.log_softmax(model(input_ids=torch.tensor([q_ids + a_ids])).logits[0].float(), -1)
        finally:
            if h:
                h.remove()
        return sum(lp[len(q_ids) + j - 1, t] for j, t in enumerate(a_ids))

    def add(mod, args, out):
        return (out[0] + d * v,) + tuple(out[1:]) if isinstance(out, tuple) else out + d * v

    terms = []
    for p in PAIRS:
        with torch.no_grad():
            rw, rl = logp(p.prompt, p.chosen), logp(p.prompt, p.rejected)
        pw, pl = logp(p.prompt, p.chosen, add), logp(p.prompt, p.rejected, add)
        terms.append(-torch.nn.functional.logsigmoid(d * beta * ((pw - rw) - (pl - rl))))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-6)


def test_the_schedule_warms_up_and_clips_as_their_trainer(lm, monkeypatch) -> None:
    """Each step's learning rate is lr * step / warmup_steps during the warm-up (0 at the
    first step, as transformers' scheduler starts), and the gradient reaching AdamW has a
    norm of at most max_grad_norm; without them, the cosine from lr and the raw gradient."""
    seen: list[tuple[float, float]] = []
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        [g] = self.param_groups
        seen.append((g["lr"], g["params"][0].grad.norm().item()))
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = BiPOSettings(lr=0.01, batch_size=2, dpo_beta=50.0, max_steps=4)  # beta 50: large gradients
    train_vector(lm, PAIRS, 1, cfg, seed=0)
    assert [lr for lr, _ in seen] == pytest.approx([0.01 * s / 100 for s in range(4)])
    assert all(norm <= 1.0 + 1e-6 for _, norm in seen)
    seen.clear()
    train_vector(lm, PAIRS, 1, BiPOSettings(lr=0.01, batch_size=2, dpo_beta=50.0, max_steps=4,
                                          warmup_steps=0, max_grad_norm=None), seed=0)
    import math
    assert [lr for lr, _ in seen] == pytest.approx(
        [0.01 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert max(norm for _, norm in seen) > 1.0  # what the clipping held back


def test_training_raises_the_chosen_markers_log_probability(lm) -> None:
    """Pairs whose chosen side carries a marker: the trained vector, added, makes the
    marked answers likelier relative to the unmarked ones than without it."""
    from fints_repro.steering.hooks import steer

    texts = ["rain again today", "markets fall", "cup glory", "new phone out", "city votes",
             "storm warning", "art show opens", "bus fares rise"]
    pairs = [Pair("u", str(i), f"Headline {i}:", f"ZQX {t}", t, 0.0, 0) for i, t in enumerate(texts)]
    v, losses = train_vector(lm, pairs, 1, BiPOSettings(lr=0.05, epochs=8, batch_size=4, dpo_beta=0.5,
                                                      warmup_steps=0), seed=0)
    assert len(losses) == 16 and losses[-1] < losses[0]
    qs = [p.prompt for p in pairs]
    w = packed(lm, qs, [p.chosen for p in pairs])
    lo = packed(lm, qs, [p.rejected for p in pairs])
    pad = lm.tokenizer.pad_token_id
    rows = list(range(len(pairs)))
    with torch.no_grad():
        base = sequence_logprobs(lm.model, *pad_batch(w, rows, pad)) - sequence_logprobs(lm.model, *pad_batch(lo, rows, pad))
        with steer(lm.model, {(1, "resid"): v}):
            steered = sequence_logprobs(lm.model, *pad_batch(w, rows, pad)) - sequence_logprobs(lm.model, *pad_batch(lo, rows, pad))
            marked = sequence_logprobs(lm.model, *pad_batch(w, rows, pad))
        plain_marked = sequence_logprobs(lm.model, *pad_batch(w, rows, pad))
    assert (steered > base).all(), (steered - base)
    assert marked.mean() > plain_marked.mean()
    # and the opposite direction lowers it
    with torch.no_grad(), steer(lm.model, {(1, "resid"): -v}):
        opposite = sequence_logprobs(lm.model, *pad_batch(w, rows, pad)) - sequence_logprobs(lm.model, *pad_batch(lo, rows, pad))
    assert (opposite < base).all()


@pytest.mark.parametrize("override, key", [
    ("steering.bipo.dpo_beta=0", "steering.bipo.dpo_beta"),
    ("steering.bipo.epochs=0", "steering.bipo.epochs"),
    ("steering.bipo.max_steps=0", "steering.bipo.max_steps"),
    ("steering.bipo.scope=group", "steering.bipo.scope"),
    ("steering.bipo.lr=-1", "steering.bipo.lr"),
    ("steering.bipo.warmup_steps=-1", "steering.bipo.warmup_steps"),
    ("steering.bipo.max_grad_norm=0", "steering.bipo.max_grad_norm"),
])
def test_bad_bipo_settings_fail_at_start_naming_the_key(override, key) -> None:
    assert_config_error(["steering=bipo", override], key)
