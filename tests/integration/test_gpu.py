"""On a CUDA device (marked ``gpu``: skipped without one): per-row steering gives the CPU's
logits, also with the layers split between the CPU and the GPU by a device map, and in bf16 the vector is added in the activation's dtype (the hooks cast it), so
a bf16 model steered by an fp32 vector equals one steered by the vector cast by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from fints_repro.models.tiny import tiny_model
from fints_repro.steering.hooks import steer

pytestmark = pytest.mark.gpu

PROMPTS = ["the quick brown fox jumps", "hi", "a medium sized prompt here"]


def _setup():
    model, tok = tiny_model("llama")
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    vectors = {(1, "attn"): torch.randn(len(PROMPTS), hidden, generator=gen),
               (2, "mlp"): torch.randn(len(PROMPTS), hidden, generator=gen)}
    vectors[(1, "attn")][1] = 0  # row 1 unsteered
    return model, enc, vectors


@torch.inference_mode()
def test_steered_logits_on_cuda_equal_the_cpus() -> None:
    model, enc, vectors = _setup()
    with steer(model, vectors):
        cpu = model(**enc).logits
    gpu_model = copy.deepcopy(model).to("cuda")
    with steer(gpu_model, vectors):
        gpu = gpu_model(**{k: v.to("cuda") for k, v in enc.items()}).logits.cpu()
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(gpu[mask], cpu[mask], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_a_bf16_model_adds_the_vector_in_bf16() -> None:
    model, enc, vectors = _setup()
    gpu_model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    batch = {k: v.to("cuda") for k, v in enc.items()}
    with steer(gpu_model, vectors):
        fp32_vectors = gpu_model(**batch).logits
    cast = {k: v.to("cuda", torch.bfloat16) for k, v in vectors.items()}
    with steer(gpu_model, cast):
        by_hand = gpu_model(**batch).logits
    assert fp32_vectors.dtype == torch.bfloat16
    assert torch.equal(fp32_vectors, by_hand)


@torch.inference_mode()
def test_steering_a_model_split_between_cpu_and_gpu_equals_the_cpu(tmp_path) -> None:
    from fints_repro.config import ModelConfig
    from fints_repro.models.loading import load_model

    model, enc, vectors = _setup()
    with steer(model, vectors):
        cpu = model(**enc).logits
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": 0, "model.layers.2": 0, "model.layers.3": "cpu",
             "model.norm": "cpu", "lm_head": 0}
    lm = load_model(ModelConfig(name="tiny", source="tiny_random", arch="llama", dtype="float32",
                                device_map=split), tmp_path)
    assert lm.model.model.layers[1].self_attn.q_proj.weight.device.type == "cuda"
    with steer(lm.model, vectors):  # vectors given on the CPU, added on each layer's device
        got = lm.model(**enc).logits.cpu()
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], cpu[mask], atol=1e-4, rtol=1e-4)
