"""``model.dtype=bfloat16`` (and ``float16``) through every model-time stage, on the CPU
with a tiny random model, each checked against the same stage in fp32.

Tolerances are stated per stage, several times what bf16 rounding gave when they were set
(in brackets), and far below what the stage's effect is (a steering vector moves the
logits by a relative 1.4; a sign error or a lost vector fails):

- generation, steered per row under the KV cache: the bf16 run's scores at each step
  against fp32 logits on the same tokens, relative L2 error <= 0.02 [0.005];
- extraction: each site's mean activations (fp32, accumulated in fp32) <= 0.02 [0.005-0.008];
- SteerX's log-prob passes: |log p| differences <= 0.01 nats [0.0024];
- BiPO: an fp32 vector trained against the bf16 model, relative error <= 0.1 [0.047], the
  final loss within 0.02 of fp32's [0.001];
- LoRA: fp32 adapter weights on the bf16 model; its held-out loss within 0.02 nats of the
  fp32 model's adapter [0.0003], and below the base model's;
- the trained reward model (one epoch): rewards within 0.03 of fp32's [0.010] and the same
  preferences.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.data.schema import Sample
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.preferences.pairs import Pair
from fints_repro.steering.extract import answer_means
from fints_repro.steering.hooks import steer
from fints_repro.steering.logprob import token_logprobs
from fints_repro.steering.methods.bipo import BiPOSettings, train_vector

CFG = ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama", device="cpu",
                  dtype="float32")
HALF = ["bfloat16", "float16"]
PROMPTS = ["the quick brown fox jumps", "hi", "a medium sized prompt here"]
QUESTIONS = ["what is it?", "say hi", "tell me"]
ANSWERS = ["a small cat", "hello there friend", "a story about a dog"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def fp32() -> LoadedModel:
    return load_model(CFG)


@pytest.fixture(scope="module", params=HALF)
def half(request) -> LoadedModel:
    return load_model(replace(CFG, dtype=request.param))


def test_half_models_are_half_and_have_their_own_cache_identity(fp32, half) -> None:
    assert half.model.dtype in (torch.bfloat16, torch.float16)
    assert half.fingerprint != fp32.fingerprint


@torch.inference_mode()
def test_steered_generation_in_half_precision_scores_as_fp32_does(fp32, half) -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = {(2, "mlp"): 0.5 * torch.randn(3, 64, generator=gen),  # fp32, one per row
               (1, "attn"): 0.5 * torch.randn(64, generator=gen)}
    enc = fp32.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with steer(half.model, vectors):
        out = half.model.generate(**enc, max_new_tokens=8, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)
    n = enc["input_ids"].shape[1]
    assert out.sequences.shape[1] == n + 8  # no row ended early: every step compared
    mask = torch.cat([enc["attention_mask"], torch.ones(3, 8, dtype=torch.long)], 1)
    with steer(fp32.model, vectors):
        ref = fp32.model(input_ids=out.sequences, attention_mask=mask).logits[:, n - 1:-1]
    unsteered = fp32.model(input_ids=out.sequences, attention_mask=mask).logits[:, n - 1:-1]
    assert _rel(scores, ref) <= 0.02
    assert _rel(unsteered, ref) > 0.5  # the vectors matter: losing one fails the check


@torch.inference_mode()
def test_the_vector_is_added_in_the_activations_dtype(half) -> None:
    enc = half.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    v = 0.3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with steer(half.model, {(2, "mlp"): v}):
        given_fp32 = half.model(**enc).logits
    with steer(half.model, {(2, "mlp"): v.to(half.model.dtype)}):
        cast_by_hand = half.model(**enc).logits
    assert torch.equal(given_fp32, cast_by_hand)


def test_extraction_in_half_precision_averages_in_fp32(fp32, half) -> None:
    sites = ["attn", "mlp", "resid"]
    ref = answer_means(fp32, QUESTIONS, ANSWERS, 2, sites, progress=False)
    got = answer_means(half, QUESTIONS, ANSWERS, 2, sites, progress=False)
    for site in sites:
        assert got[site].dtype == torch.float32
        assert _rel(got[site], ref[site]) <= 0.02, site


def test_steerx_log_probs_in_half_precision(fp32, half) -> None:
    ref = token_logprobs(fp32, QUESTIONS, ANSWERS)
    got = token_logprobs(half, QUESTIONS, ANSWERS)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert (g - r).abs().max().item() <= 0.01


def test_bipo_trains_an_fp32_vector_against_a_half_model(fp32, half) -> None:
    texts = ["rain again today", "markets fall", "cup glory", "new phone out", "city votes",
             "storm warning", "art show opens", "bus fares rise"]
    pairs = [Pair("u", str(i), f"Headline {i}:", f"ZQX {t}", t, 0.0, 0) for i, t in enumerate(texts)]
    cfg = BiPOSettings(lr=0.05, epochs=4, batch_size=4, dpo_beta=0.5, warmup_steps=0)
    ref, ref_losses = train_vector(fp32, pairs, 1, cfg, seed=0)
    got, losses = train_vector(half, pairs, 1, cfg, seed=0)
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= 0.1
    assert losses[-1] < losses[0] - 0.3 and abs(losses[-1] - ref_losses[-1]) <= 0.02


def test_lora_trains_fp32_adapters_on_a_bf16_model(tmp_path: Path) -> None:
    from fints_repro.backbones import FitContext, backbone_schema, build_backbone
    from fints_repro.backbones.lora import LoraSettings
    from fints_repro.config import EvalConfig, GenerationConfig
    from fints_repro.tasks import build_task
    from tests.unit import test_lora as lora

    losses = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(replace(CFG, dtype=dtype))
        train = replace(lora.FAST, epochs=4)  # half the unit test's budget: enough to learn
        cfg = backbone_schema()(name="lora", k=0, lora=LoraSettings(train=train))
        backbone = build_backbone(cfg, build_task(lora.DATASET, GenerationConfig(), EvalConfig()),
                                  lambda: None)
        resources = FitContext(cache_dir=tmp_path / dtype)
        backbone.fit(lm, lora._samples(("alice",)), resources)
        held = backbone.training_examples(lm, lora._items("alice", 3, start=50))
        base = lora._loss(lm.model, lm.tokenizer, held)
        peft_lm = backbone.model(lm)
        adapter_dtypes = {p.dtype for n, p in peft_lm.model.named_parameters() if "lora_" in n}
        with backbone.user_context(lm, ["alice"]) as kw:
            losses[dtype] = lora._loss(peft_lm.model, lm.tokenizer, held,
                                       adapter_names=kw["adapter_names"])
        backbone.close(lm)
        assert adapter_dtypes == {torch.float32}
        assert losses[dtype] < base - 0.3
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.02


def test_a_reward_model_trained_on_a_bf16_model_scores_as_fp32s(tmp_path: Path) -> None:
    from tests.unit import test_reward_model as rm

    held = rm._pairs("alice", 500, 8)
    samples = [Sample(f"alice-q{j}", "alice", p.prompt, None, ()) for j, p in enumerate(held)]
    candidates = [[p.chosen, p.rejected] for p in held]
    rewards = {}
    with pytest.MonkeyPatch.context() as mp:
        for dtype in ("float32", "bfloat16"):
            lm = load_model(replace(CFG, dtype=dtype))
            bb, res = rm._backbone(tmp_path / dtype, mp, {"alice": rm._pairs("alice", 0, 8)},
                                   train=rm.QUICK, n=2)
            bb.fit(lm, samples, res)
            rewards[dtype] = torch.tensor(bb.selector.reward_scores(samples, candidates))
            bb.close(lm)
    assert not torch.equal(rewards["float32"][:, 0], rewards["float32"][:, 1])
    assert (rewards["bfloat16"].argmax(1) == rewards["float32"].argmax(1)).all()
    assert (rewards["bfloat16"] - rewards["float32"]).abs().max().item() <= 0.03

