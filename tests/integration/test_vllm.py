"""vLLM's engine against transformers' on the embedded model (marked ``vllm``: skipped
where vLLM is not installed; `make install VLLM=1 VENV=.venv-vllm; make test-vllm
VENV=.venv-vllm`)."""

from __future__ import annotations

import dataclasses

import pytest

from fints_repro.models.generation import DecodingParams, generate_batches

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup():
    from fints_repro.backbones import build_backbone
    from fints_repro.compose import compose_run
    from fints_repro.models.chat import render_chat
    from fints_repro.models.engines import build_engine
    from fints_repro.stages import open_run

    ctx = open_run(["+exp=demo", "logger=none", "progress=false", "dataset.demo.n_users=2"])
    lm = ctx.model(None)
    b = dataclasses.replace(ctx.cfg.backbone, name="rag")
    prompts = build_backbone(b, ctx.task, ctx.retriever).build_prompts(ctx.samples)
    texts = [render_chat(lm.tokenizer, p.text, lm.system_prompt) for p in prompts]
    engine = build_engine(compose_run(["engine=vllm"]).engine)
    yield lm, texts, engine
    engine.close()


def _all(engine, lm, texts, params, **kw):
    out = {}
    for idx, gens in engine.generate(lm, texts, params, progress=False, **kw):
        n = len(gens) // len(idx)
        out.update({i: gens[j * n:(j + 1) * n] for j, i in enumerate(idx)})
    return [out[i] for i in range(len(texts))]


def test_greedy_equals_transformers_batched_on_the_demo_rag_prompts(setup) -> None:
    lm, texts, engine = setup
    params = DecodingParams(max_new_tokens=24)
    hf: dict[int, str] = {}
    for idx, gens in generate_batches(lm, texts, params, batch_size=8, progress=False):
        hf.update(zip(idx, gens))
    assert len(texts) == 8
    assert _all(engine, lm, texts, params) == [[hf[i]] for i in range(len(texts))]


def test_sampled_candidates_are_n_draws_of_one_request_and_follow_the_seed(setup) -> None:
    lm, texts, engine = setup
    params = DecodingParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, seed=3)
    first = _all(engine, lm, texts[:3], params, num_return_sequences=4)
    assert [len(c) for c in first] == [4, 4, 4]
    assert all(len(set(c)) > 1 for c in first)  # four draws, not one decoded four times
    assert _all(engine, lm, texts[:3], params, num_return_sequences=4) == first
    other = _all(engine, lm, texts[:3], dataclasses.replace(params, seed=4), num_return_sequences=4)
    assert other != first


def test_greedy_candidates_are_decoded_once_and_repeated(setup) -> None:
    lm, texts, engine = setup
    got = _all(engine, lm, texts[:2], DecodingParams(max_new_tokens=8), num_return_sequences=3)
    assert [len(set(c)) for c in got] == [1, 1] and [len(c) for c in got] == [3, 3]


def test_a_model_built_in_memory_is_refused_naming_the_source(setup) -> None:
    from fints_repro.errors import ConfigError
    from fints_repro.models.engines import build_engine
    from fints_repro.models.loading import LoadedModel
    from fints_repro.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    engine = build_engine(setup[2].cfg)
    with pytest.raises(ConfigError, match="model.source=tiny_random"):
        list(engine.generate(LoadedModel(model, tok, "tiny", "tiny"), ["a"], DecodingParams(4)))


def test_per_user_lora_adapters_through_lora_requests_equal_peft_mixed_batches(setup, tmp_path) -> None:
    """Rows of two users' adapters and base-model rows in one call: vLLM's LoRARequests
    (each row its adapter's folder) against PEFT's mixed batch (adapter_names) on
    transformers, greedy, token for token. The adapters are random (B drawn, not zero),
    so each changes the generations."""
    import contextlib
    import copy

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from fints_repro.models.engines import RowAdapter, build_engine

    lm, texts, _ = setup
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        wrapped = get_peft_model(copy.deepcopy(lm.model), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        wrapped.save_pretrained(tmp_path / f"user{seed}")
        paths.append(str(tmp_path / f"user{seed}"))
    adapters = [None if i % 3 == 2 else RowAdapter(f"lora:u{i % 3}", paths[i % 3], 8)
                for i in range(len(texts))]
    params = DecodingParams(max_new_tokens=24)

    peft = PeftModel.from_pretrained(copy.deepcopy(lm.model), paths[0], adapter_name="a0")
    peft.load_adapter(paths[1], adapter_name="a1")
    peft.eval()
    names = ["__base__" if a is None else f"a{paths.index(a.path)}" for a in adapters]

    def context(rows):
        return contextlib.nullcontext({"adapter_names": [names[i] for i in rows]})

    hf: dict[int, str] = {}
    for idx, gens in generate_batches(dataclasses.replace(lm, model=peft), texts, params,
                                      batch_size=8, batch_context=context, progress=False):
        hf.update(zip(idx, gens))
    base: dict[int, str] = {}
    for idx, gens in generate_batches(lm, texts, params, batch_size=8, progress=False):
        base.update(zip(idx, gens))
    changed = sum(hf[i] != base[i] for i, a in enumerate(adapters) if a is not None)
    assert changed >= 3, f"the random adapters changed only {changed} rows"

    engine = build_engine(setup[2].cfg, adapter_rank=8)
    try:
        got = _all(engine, lm, texts, params, adapters=adapters)
    finally:
        engine.close()
    assert got == [[hf[i]] for i in range(len(texts))]
