"""The CPU speed-ups compute what the plain path computes.

- packed linears: a full batch's rows go through MKL's packed GEMM (counted) and match
  F.linear to float rounding; any other row count, autograd or a weight changed in place
  uses F.linear exactly; the model is left as found, also after an exception; packed
  copies are reused across blocks and packed again after a change;
- generation with packed weights gives the same tokens (tiny models), also with N
  sampled candidates per prompt (B*N rows) and transformers' static cache;
- packed weights exist only for fp32 CPU models, and ``model.cpu_packed_weights=false``
  (or ``packed_weights=False``) turns them off: then no linear is touched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fints_repro.config import ModelConfig
from fints_repro.generation import DecodingParams, generate_batches
from fints_repro.models.cpu import PackedWeights, packed_gemm_available, packed_linears, tune_malloc
from fints_repro.models.loading import load_model
from fints_repro.models.tiny import tiny_model

needs_mkl = pytest.mark.skipif(not packed_gemm_available(), reason="torch built without MKL")
PROMPTS = ["the quick brown fox jumps over", "hi", "a medium sized prompt here", "ok then"]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 48, bias=False)).eval()


def _overrides(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


@needs_mkl
def test_packed_rows_match_linear_and_other_rows_are_exact() -> None:
    model = _mlp()
    x8, x3 = torch.randn(8, 1, 48), torch.randn(3, 1, 48)
    with torch.no_grad():
        ref8, ref3 = model(x8), model(x3)
        with packed_linears(model, 8) as packed:
            assert set(packed) == {"0", "2"}
            got8, got3 = model(x8), model(x3)
            calls = {n: p.calls for n, p in packed.items()}
    assert calls == {"0": 1, "2": 1}  # only the 8-row call was packed
    torch.testing.assert_close(got8, ref8, rtol=1e-5, atol=1e-6)
    assert torch.equal(got3, ref3)
    assert _overrides(model) == []


@needs_mkl
def test_grad_and_changed_weights_fall_back_to_linear() -> None:
    model = _mlp()
    lin = model[0]
    x = torch.randn(8, 48)
    with packed_linears(model, 8) as packed:
        y = lin(x)  # autograd on: plain F.linear, differentiable
        y.sum().backward()
        assert packed["0"].calls == 0 and lin.weight.grad is not None
        with torch.no_grad():
            lin.weight.mul_(2.0)  # in place: the packed copy is stale
            assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        assert packed["0"].calls == 0


@needs_mkl
def test_model_is_restored_after_an_exception() -> None:
    model = _mlp()
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linears(model, 4):
            assert len(_overrides(model)) == 2
            raise RuntimeError("boom")
    assert _overrides(model) == []
    assert isinstance(model[0].forward.__self__, nn.Linear)


@needs_mkl
def test_kept_packs_are_reused_and_repacked_after_a_change() -> None:
    model, keep = _mlp(), PackedWeights()
    with packed_linears(model, 8, keep) as first:
        a = dict(first)
    with packed_linears(model, 8, keep) as second:
        assert all(second[n] is a[n] for n in a)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    x = torch.randn(8, 96)
    with torch.no_grad(), packed_linears(model, 8, keep) as third:
        assert third["0"] is a["0"] and third["2"] is not a["2"]
        torch.testing.assert_close(model[2](x), F.linear(x, model[2].weight), rtol=1e-5, atol=1e-5)
        assert third["2"].calls == 1
    with torch.no_grad():
        model[0].weight.data += 0.01  # bypasses the version counter, as PEFT's merge does
    with torch.no_grad(), packed_linears(model, 8, keep) as fourth:
        assert fourth["0"] is not a["0"] and fourth["2"] is third["2"]
        x = torch.randn(8, 48)
        torch.testing.assert_close(model[0](x), F.linear(x, model[0].weight, model[0].bias),
                                   rtol=1e-5, atol=1e-5)
    with packed_linears(model, 4, keep) as other_rows:
        assert all(other_rows[n] is not fourth[n] for n in fourth)


def test_nothing_is_packed_where_it_does_not_apply() -> None:
    model = _mlp()
    with packed_linears(model, 1) as packed:
        assert packed == {}
    with packed_linears(model.to(torch.float64), 8) as packed:
        assert packed == {}


def test_tune_malloc_is_idempotent() -> None:
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected
    assert tune_malloc() is expected


def _texts(lm, packed: bool | None, batch_size: int = 4, params=None, **kw) -> list[str]:
    out = {}
    params = params or DecodingParams(max_new_tokens=10)
    for idx, gens in generate_batches(lm, PROMPTS, params, batch_size=batch_size, progress=False,
                                      packed_weights=packed, **kw):
        out.update(zip(idx, gens))
    return [out[i] for i in range(len(PROMPTS))]


@needs_mkl
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_generation_with_packed_weights_gives_the_same_tokens(arch: str) -> None:
    lm = load_model(ModelConfig(name="t", source="tiny_random", arch=arch, dtype="float32",
                                device="cpu"))
    assert lm.packed is not None and lm.packed.layers == {}
    packed = _texts(lm, True)
    assert lm.packed.rows == 4 and lm.packed.layers  # kept for the next call
    assert sum(p.calls for p in lm.packed.layers.values()) > 0  # decoding steps ran packed
    assert packed == _texts(lm, False)
    assert _overrides(lm.model) == []


@needs_mkl
def test_packed_weights_with_candidates_and_static_cache() -> None:
    lm = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="float32",
                                device="cpu"))
    sample = DecodingParams(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0, seed=1)
    plain = _texts(lm, False, params=sample, num_return_sequences=3)
    assert _texts(lm, True, params=sample, num_return_sequences=3) == plain
    assert lm.packed.rows == 4 * 3  # a decoding step of a full batch runs B*N rows
    assert sum(p.calls for p in lm.packed.layers.values()) > 0
    assert _texts(lm, True, cache_implementation="static") == _texts(lm, False)


def _packs_during_generation(lm, **kw) -> list[str]:
    """The linears overridden while a generation is under way."""
    batches = generate_batches(lm, PROMPTS, DecodingParams(max_new_tokens=3), batch_size=2,
                               progress=False, **kw)
    next(batches)
    seen = _overrides(lm.model)
    batches.close()
    return seen


@needs_mkl
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_packed_weights_only_for_fp32_cpu_models(dtype: str) -> None:
    lm = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype=dtype,
                                device="cpu"))
    assert lm.packed is None
    assert _packs_during_generation(lm) == []
    assert _packs_during_generation(lm, packed_weights=True) == []  # nothing fp32 to pack


@needs_mkl
def test_packed_weights_switched_off() -> None:
    off = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="float32",
                                 device="cpu", cpu_packed_weights=False))
    assert off.packed is None
    assert _packs_during_generation(off) == []
    on = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="float32",
                                device="cpu"))
    assert on.packed is not None and _packs_during_generation(on)
    assert _packs_during_generation(on, packed_weights=False) == []


@needs_mkl
def test_a_consumer_stopping_early_leaves_the_model_clean() -> None:
    lm = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="float32",
                                device="cpu"))
    batches = generate_batches(lm, PROMPTS, DecodingParams(max_new_tokens=3), batch_size=2,
                               progress=False)
    next(batches)
    assert _overrides(lm.model)  # packed while the generation is under way
    batches.close()
    assert _overrides(lm.model) == []


@needs_mkl
def test_a_merged_peft_adapter_is_seen_by_kept_packs() -> None:
    """PEFT's merge_adapter adds the LoRA delta through ``weight.data``; generation after
    it must use the merged weights, not the packed copies of the old ones."""
    from peft import LoraConfig, get_peft_model

    lm = load_model(ModelConfig(name="t", source="tiny_random", arch="llama", dtype="float32",
                                device="cpu"))
    base = _texts(lm, False)
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    peft_model.eval()
    lm.model = peft_model
    unmerged = _texts(lm, True)  # packs the base weights (and LoRA's), kept on lm
    assert unmerged == _texts(lm, False) != base
    peft_model.merge_adapter()  # from now on the base layers alone, with merged weights
    merged = _texts(lm, False)
    assert merged != base  # stale packed base weights would give `base`
    assert _texts(lm, True) == merged
