"""``model.device_map``: a model placed module by module with accelerate (here: half its
decoder layers offloaded to disk, so their weights sit on ``meta`` and accelerate's hooks
load them at each forward) steers, extracts and scores exactly as the model in one piece;
the hooks put each vector on the device and dtype of the activation it is added to."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fints_repro.config import ModelConfig
from fints_repro.errors import ConfigError
from fints_repro.models.loading import load_model
from fints_repro.steering.extract import answer_means
from fints_repro.steering.hooks import steer
from fints_repro.steering.logprob import token_logprobs

CFG = ModelConfig(name="tiny_random_llama", source="tiny_random", arch="llama", device="auto",
                  dtype="float32")
# Layers 2 and 3 (the steered ones) offloaded: their weights live on disk, not in memory.
MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
       "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk",
       "model.norm": "cpu", "lm_head": "cpu"}
PROMPTS = ["the quick brown fox", "hi", "a prompt of middling length"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_model(CFG, cache), load_model(replace(CFG, device_map=MAP), cache)


def test_a_mapped_model_is_really_offloaded_and_keeps_the_cache_identity(models) -> None:
    whole, mapped = models
    assert mapped.model.hf_device_map == MAP
    assert mapped.model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    assert hasattr(mapped.model.model.layers[3], "_hf_hook")  # accelerate loads it per forward
    assert mapped.device.type == "cpu"
    # The same numerics on the same device type: the same cache entries.
    assert mapped.fingerprint == whole.fingerprint


@torch.inference_mode()
def test_steered_generation_under_a_device_map_equals_the_whole_model(models) -> None:
    whole, mapped = models
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(len(PROMPTS), 64, generator=gen)
    vectors = {(2, "mlp"): 4 * rows, (3, "attn"): 4 * rows[0]}
    enc = whole.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = {}
    for name, lm in (("whole", whole), ("mapped", mapped)):
        with steer(lm.model, vectors, "generated"):
            out[name] = lm.model.generate(**enc, max_new_tokens=6, do_sample=False,
                                          output_scores=True, return_dict_in_generate=True)
    with torch.inference_mode():
        plain = whole.model.generate(**enc, max_new_tokens=6, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
    assert torch.equal(out["mapped"].sequences, out["whole"].sequences)
    for a, b in zip(out["mapped"].scores, out["whole"].scores):
        assert torch.equal(a, b)
    # ... and the vectors did something (decoding steps, the only steered positions).
    assert not torch.equal(out["whole"].scores[1], plain.scores[1])


def test_extraction_and_log_probs_under_a_device_map_equal_the_whole_model(models) -> None:
    whole, mapped = models
    questions, answers = ["what is it?", "say hi"], ["a small cat", "hello there friend"]
    a = answer_means(whole, questions, answers, 3, ["attn", "mlp", "resid"], progress=False)
    b = answer_means(mapped, questions, answers, 3, ["attn", "mlp", "resid"], progress=False)
    for site in a:
        assert torch.equal(a[site], b[site])
    for x, y in zip(token_logprobs(whole, questions, answers), token_logprobs(mapped, questions, answers)):
        assert torch.equal(x, y)


def test_an_auto_map_places_a_model_built_in_memory(tmp_path: Path) -> None:
    lm = load_model(replace(CFG, device_map="auto"), tmp_path)
    if torch.cuda.is_available():
        assert 0 in set(lm.model.hf_device_map.values())
    else:  # everything on the CPU: the whole model's numerics and cache entries
        assert set(lm.model.hf_device_map.values()) == {"cpu"}
        assert lm.fingerprint == load_model(CFG, tmp_path).fingerprint


@pytest.mark.parametrize("override, key", [
    (dict(device_map="everywhere"), "model.device_map"),
    (dict(device_map={"model.layers.0": "gpu7"}), "model.device_map.model.layers.0"),
])
def test_a_bad_device_map_names_its_key(override, key) -> None:
    from fints_repro.checks import check_device_map

    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}="):
        check_device_map(replace(CFG, **override), "hf")


def test_a_device_map_is_refused_for_vllm() -> None:
    from fints_repro.checks import check_device_map

    with pytest.raises(ConfigError, match=r"^model.device_map=.*tensor_parallel_size"):
        check_device_map(replace(CFG, device_map="auto"), "vllm")
