"""Engine routing (models/engines): what each generation of a run asks of the engine, and
which engine generates it. A recording engine stands in for vLLM: it generates with
transformers (so the rows can be compared) and records what it was given."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import fints_repro.models.engines as engines_mod
from fints_repro.backbones.adapters import safe_name
from fints_repro.config import EngineConfig
from fints_repro.errors import ConfigError
from fints_repro.models.engines.base import Engine
from fints_repro.models.engines.hf import HFEngine
from fints_repro.models.generation import generate_batches

from ..conftest import run


class Recording(Engine):
    """Supports N samples only (as vLLM); generates with transformers and records."""

    name = "recording"
    supports = frozenset({"n_samples"})
    calls: list[tuple[str, int]] = []

    def generate(self, lm, texts, params, *, batch_context=None, adapters=None,
                 desc="generate", **kw):
        assert batch_context is None, "an engine without per-row hooks got a batch context"
        assert adapters is None or not any(adapters), "rows with adapters at an engine without"
        todo = len(texts) - len(kw.get("skip", ()))
        Recording.calls.append((desc, todo))
        kw.pop("cache_implementation", None)
        return generate_batches(lm, texts, params, desc=desc, **kw)


class LoadsAdapters(Engine):
    """Supports per-row adapters the way vLLM does: from each row's adapter folder. Rows
    are generated in groups of one adapter, each group by a fresh copy of the base model
    with that folder loaded by PEFT (transformers' numerics, nothing of the backbone's
    own wrapper), and the adapters it was given are recorded."""

    name = "loads_adapters"
    supports = frozenset({"n_samples", "per_row_adapters"})
    seen: list = []
    ranks: list[int] = []

    def __init__(self, cfg, adapter_rank=0):
        super().__init__(cfg, adapter_rank)
        LoadsAdapters.ranks.append(adapter_rank)

    def generate(self, lm, texts, params, *, batch_context=None, adapters=None, skip=frozenset(),
                 desc="generate", **kw):
        import copy

        from peft import PeftModel

        assert batch_context is None
        adapters = adapters or [None] * len(texts)
        kw.pop("cache_implementation", None)
        groups: dict = {}
        for i in range(len(texts)):
            if i not in skip:
                groups.setdefault(adapters[i], []).append(i)
        for adapter, rows in groups.items():
            LoadsAdapters.seen.append((desc, adapter, [texts[i] for i in rows]))
            base = copy.deepcopy(lm.model)
            if isinstance(base, PeftModel):  # the backbone's wrapper: its layers taken out
                base = base.base_model.unload()
            model = base if adapter is None else PeftModel.from_pretrained(base, adapter.path).eval()
            own = dataclasses.replace(lm, model=model)
            for idx, gens in generate_batches(own, [texts[i] for i in rows], params, desc=desc, **kw):
                yield [rows[j] for j in idx], gens


@pytest.fixture
def recording(monkeypatch):
    reg = engines_mod.ENGINES.copy()
    reg.register("recording")(Recording)
    reg.register("loads_adapters")(LoadsAdapters)
    monkeypatch.setattr(engines_mod, "ENGINES", reg)
    Recording.calls = []
    LoadsAdapters.seen, LoadsAdapters.ranks = [], []
    return Recording


def _lm(engine: Engine | None):
    from fints_repro.models.loading import LoadedModel
    from fints_repro.models.tiny import tiny_model

    model, tok = tiny_model("llama")
    return LoadedModel(model, tok, fingerprint="tiny", name="tiny", engine=engine)


def test_engine_for_routes_by_capability_and_the_steered_setting(recording) -> None:
    lm = _lm(recording(EngineConfig(name="recording", steered="hf")))
    assert engines_mod.engine_for(lm, ()) is lm.engine
    assert engines_mod.engine_for(lm, {"n_samples"}) is lm.engine
    assert isinstance(engines_mod.engine_for(lm, {"per_row_steering"}), HFEngine)
    refusing = dataclasses.replace(lm, engine=recording(EngineConfig(name="recording", steered="refuse")))
    with pytest.raises(ConfigError, match=r"engine=recording cannot generate the rows of 'x': it "
                                          r"lacks per_row_adapters, per_row_steering\. engine\.steered=hf"):
        engines_mod.engine_for(refusing, {"per_row_steering", "per_row_adapters"}, "the rows of 'x'")
    assert isinstance(engines_mod.engine_for(_lm(None), {"per_row_steering"}), HFEngine)
    with pytest.raises(ValueError, match="unknown engine capabilities.*'logprob'"):
        engines_mod.engine_for(lm, {"logprob"})


def test_a_steered_method_is_refused_at_start_up_naming_method_engine_and_capability(
        recording, tiny_overrides, tmp_path) -> None:
    ov = ["+exp=demo", *tiny_overrides, "engine.name=recording", "engine.steered=refuse"]
    with pytest.raises(ConfigError, match=r"engine=recording cannot generate the rows of method "
                                          r"'rag\+caa\(ours\)': it lacks per_row_steering"):
        run(ov, tmp_path / "run")
    assert recording.calls == []  # before any model time
    lora = [*tiny_overrides, "engine.name=recording", "engine.steered=refuse", "backbone=lora"]
    with pytest.raises(ConfigError, match=r"method 'lora': it lacks per_row_adapters"):
        run(lora, tmp_path / "run2")


def test_unsteered_generations_go_to_the_engine_and_steered_rows_to_the_hooks(
        recording, tiny_overrides, tmp_path) -> None:
    methods = "methods=[{backbone: zero_shot},{backbone: rag, steering: caa}]"
    ref = run(["+exp=demo", *tiny_overrides, methods], tmp_path / "hf")
    got = run(["+exp=demo", *tiny_overrides, methods, "engine.name=recording",
               "engine.steered=hf", f"cache_dir={tmp_path / 'cache2'}"], tmp_path / "rec")
    by_desc = dict(recording.calls)
    # 3 users x 4 items x 2 attempts of the pair generator, the 6 zero-shot rows; the
    # steered rows (every row of rag+caa here) were generated by transformers' hooks
    assert by_desc == {"pairs": 24, "zero_shot": 6}
    for method in ("zero_shot", "rag+caa"):
        a = [json.loads(x) for x in (tmp_path / "hf" / method / "predictions.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (tmp_path / "rec" / method / "predictions.jsonl").read_text().splitlines()]
        assert [r["candidates"] for r in a] == [r["candidates"] for r in b]
        # the engine is part of the generation cache key of the rows it generated
        same_key = [r["cache_key"] for r in a] == [r["cache_key"] for r in b]
        assert same_key == (method == "rag+caa")
    assert got["engine"] == "recording" and ref["engine"] == "hf"
    assert got["methods"]["rag+caa"]["rougeL"] == ref["methods"]["rag+caa"]["rougeL"]


def test_engine_settings_are_checked_with_their_key(tiny_overrides) -> None:
    from ..conftest import assert_config_error

    assert_config_error([*tiny_overrides, "engine.steered=maybe"], "engine.steered")
    assert_config_error([*tiny_overrides, "engine=vllm", "engine.vllm.chunk_size=0"],
                        "engine.vllm.chunk_size")
    assert_config_error([*tiny_overrides, "engine=vllm", "engine.vllm.gpu_memory_utilization=1.5"],
                        "engine.vllm.gpu_memory_utilization")
    from fints_repro.compose import check_names, compose_run

    with pytest.raises(ConfigError, match=r"unknown engine\.name='vlm'.*did you mean 'vllm'"):
        check_names(compose_run([*tiny_overrides, "engine.name=vlm"]))


def test_lora_rows_go_to_an_engine_that_loads_each_users_adapter_from_its_folder(
        recording, tiny_overrides, tmp_path) -> None:
    """The LoRA backbone's rows at an engine that loads adapters itself (as vLLM's
    LoRARequest): each row gets its own user's adapter folder, and generating each user's
    rows from that folder alone gives the rows the hooks' engine gives with every adapter
    in one PEFT wrapper (adapter_names). The engine was told the adapters' rank before
    any was trained; users without history run the base model."""
    ov = [*tiny_overrides, "backbone=lora", "backbone.lora.r=4", "backbone.lora.train.epochs=2"]
    ref = run(ov, tmp_path / "hf")
    got = run([*ov, "engine.name=loads_adapters", "engine.steered=refuse"], tmp_path / "own")
    assert LoadsAdapters.ranks == [4]
    rows = [json.loads(x) for x in (tmp_path / "own" / "lora" / "predictions.jsonl").read_text().splitlines()]
    user_of = {r["prompt"]: r["user"] for r in rows}
    assert len(user_of) == len(rows), "the test needs one prompt per row"
    users: dict = {}
    for desc, adapter, prompts in LoadsAdapters.seen:
        if desc == "lora":
            users.setdefault(adapter, set()).update(user_of[t] for t in prompts)
    with_adapter = {a: u for a, u in users.items() if a is not None}
    assert len(with_adapter) >= 2, "rows of at least two users with adapters"
    for adapter, us in with_adapter.items():
        assert len(us) == 1, f"rows of several users share the adapter {adapter.path}"
        (user,) = us
        assert Path(adapter.path).name == safe_name(user) and adapter.rank == 4
        assert Path(adapter.path, "adapter_model.safetensors").is_file()
        assert adapter.name.startswith("lora:")
    ref_rows = [json.loads(x) for x in (tmp_path / "hf" / "lora" / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"]: r["candidates"] for r in rows} == {r["id"]: r["candidates"] for r in ref_rows}
    assert got["methods"]["lora"]["rougeL"] == ref["methods"]["lora"]["rougeL"]
