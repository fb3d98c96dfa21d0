"""architecture: small runs (the unit checks: tests.unit.test_architecture)."""

from __future__ import annotations
import json
import pytest
from fints_repro.compose import compose_run
from fints_repro.errors import ConfigError
from tests.conftest import run
from fints_repro.backbones import BACKBONES
from fints_repro.models.engines import hf as hf_engine
from tests.unit.test_architecture import AUTHORS, PROBE_LOG, ProbeBackbone, _generations, _get, _methods  # noqa: E402


def test_a_method_decodes_with_its_own_generation_settings_and_nulls_are_the_checkpoints(
        tiny_overrides, tmp_path) -> None:
    """Decoding per method (the authors sample their steered rows at T = 0.1 and leave the
    unsteered ones to the checkpoint's generation config): a method's generation overrides
    hold for it alone, and null takes the checkpoint's value."""
    from fints_repro.models.generation import resolve_decoding
    from fints_repro.models.loading import load_model

    ov = ["+exp=demo_compare", *tiny_overrides, "generation.do_sample=null", "generation.top_p=null",
          "methods=[{backbone: zero_shot, overrides: {generation.temperature: null}},"
          "{backbone: rag, overrides: {generation.temperature: 0.7, generation.max_new_tokens: 3}}]"]
    m = _methods(ov)
    assert m["zero_shot"].generation.temperature is None and m["rag"].generation.temperature == 0.7
    assert m["rag"].generation.max_new_tokens == 3 and m["zero_shot"].generation.max_new_tokens is None
    assert all(x.generation.do_sample is None for x in m.values())
    model = load_model(compose_run(ov).model).model
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    model.generation_config.top_p = 0.9
    p = resolve_decoding(None, None, None, model, max_new_tokens=5, seed=1)
    assert (p.do_sample, p.temperature, p.top_p, p.max_new_tokens) == (True, 0.6, 0.9, 5)
    p = resolve_decoding(False, 0.1, None, model, max_new_tokens=5, seed=1)
    assert (p.do_sample, p.temperature, p.top_p) == (False, 0.1, 0.9)
    summary = run(ov, tmp_path / "run")  # the tiny model's checkpoint config: greedy, T = 1
    assert summary["methods"]["zero_shot"]["decoding"] == {
        "do_sample": False, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}
    assert summary["methods"]["rag"]["decoding"] == {
        "do_sample": False, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 3}


@pytest.mark.parametrize("override,key", [
    ("steering.layer=4", "steering.layer"),  # the tiny model has layers 0..3
    ("dataset.task_type=nope", "dataset.task_type"),
    ("generation.postprocess=nope", "generation.postprocess"),
    ("dataset.metrics=[rouge,bleu]", "dataset.metrics"),
    ("retriever.name=nope", "retriever.name"),
    ("logger.name=nope", "logger.name"),
    ("threads=0", "threads"),
])
def test_names_and_the_layer_fail_before_data_or_model_load(override, key, tiny_overrides,
                                                            tmp_path, monkeypatch) -> None:
    import fints_repro.pipeline as pipeline

    def forbidden(*a, **k):
        raise AssertionError("loaded data or a model before checking the config")

    monkeypatch.setattr(pipeline, "load_model", forbidden)
    monkeypatch.setattr(pipeline, "load_samples", forbidden)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(["+exp=demo_compare", *tiny_overrides, override], tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_every_component_kind_has_one_registry_that_finds_its_plugins_by_itself() -> None:
    """Each registry imports its package's modules on first use: every built-in plug-in is
    there without a list of imports; a duplicate names both places; a miss suggests the
    near names."""
    from fints_repro.data.load import LOADERS
    from fints_repro.eval.metrics import METRICS
    from fints_repro.eval.postprocess import POSTPROCESS
    from fints_repro.retrieval.base import RETRIEVERS
    from fints_repro.steering import STEERING
    from fints_repro.tasks import TASKS
    from fints_repro.tracking import TRACKERS

    expected = {TASKS: ["function_calling", "text_gen", "text_style"],
                BACKBONES: ["lora", "rag", "reward_model", "zero_shot"],
                STEERING: ["bipo", "caa", "fine_grained", "none", "steerx"],
                METRICS: ["meteor", "rouge", "style"], POSTPROCESS: ["fints_first_line", "strip"],
                RETRIEVERS: ["bm25", "contriever", "dense", "minilm"],
                LOADERS: ["demo", "demo_pwab", "demo_style", "lamp", "longlamp", "pwab"],
                TRACKERS: ["none", "wandb"]}
    for registry, names in expected.items():  # (this file registers a probe backbone)
        assert [n for n in registry.names() if not registry.origin(n).startswith("tests.")] == names
        with pytest.raises(ValueError, match=rf"{registry.kind} {names[0]!r} is registered twice: "
                                             r"by fints_repro\.\S+ and by builtins\.object"):
            registry.copy().register(names[0])(object)
    with pytest.raises(ConfigError) as e:
        STEERING.get("fine_graned", "steering.name")
    assert str(e.value) == ("unknown steering.name='fine_graned' (steering method); did you mean "
                            "'fine_grained'? known: ['bipo', 'caa', 'fine_grained', 'none', 'steerx']")
    with pytest.raises(ConfigError) as e:
        TRACKERS.get("tensorboard", "logger.name")
    assert str(e.value) == "unknown logger.name='tensorboard' (tracker); known: ['none', 'wandb']"


def test_a_run_records_its_task_and_reports_read_metric_names_from_it(tiny_overrides,
                                                                      tmp_path) -> None:
    summary = run(["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: zero_shot}]"],
                  tmp_path / "run")
    assert summary["task"] == {"name": "text_gen", "metrics": ["rouge1", "rougeL"],
                               "primary": "rougeL"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["task"]["primary"] == "rougeL"


def test_a_rerun_with_a_changed_config_never_reuses_the_run_dirs_rows(tiny_overrides,
                                                                      tmp_path) -> None:
    base = [o for o in tiny_overrides if not o.startswith("cache_dir=")]

    def go(cache: str, tokens: int, run_dir: str) -> dict:
        return run(["+exp=demo_compare", *base, f"cache_dir={tmp_path / cache}",
                    "methods=[{backbone: zero_shot}]", f"dataset.max_new_tokens={tokens}"],
                   tmp_path / run_dir)

    first = go("c1", 3, "run")
    short = _generations(tmp_path / "run", "zero_shot")
    # same run dir, more tokens, a fresh generation cache: every row is generated anew
    again = go("c2", 8, "run")
    assert again["methods"]["zero_shot"]["n_cached"] == 0
    fresh = go("c3", 8, "fresh")
    assert _generations(tmp_path / "run", "zero_shot") == _generations(tmp_path / "fresh", "zero_shot")
    assert again["methods"]["zero_shot"]["rougeL"] == fresh["methods"]["zero_shot"]["rougeL"]
    assert _generations(tmp_path / "run", "zero_shot") != short
    # the same config again, with an empty cache: every row comes back from the run dir
    same = go("c4", 8, "run")
    assert same["methods"]["zero_shot"]["n_generated"] == 0
    assert same["methods"]["zero_shot"]["n_cached"] == first["methods"]["zero_shot"]["n"]


def test_backbone_lifecycle_fit_context_candidates_select(tiny_overrides, tmp_path) -> None:
    PROBE_LOG.clear()
    ov = ["+exp=demo_compare", *tiny_overrides, "methods=[]", "backbone.name=test_probe",
          "steering=none", "generation.do_sample=true", "generation.temperature=1.0",
          "generation.batch_size=2"]
    summary = run(ov, tmp_path / "run")
    assert PROBE_LOG["fit"] == [["demo_user_00", "demo_user_01", "demo_user_02"]]
    rows = [json.loads(x) for x in
            (tmp_path / "run" / "test_probe" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n_samples"] == 6
    # entered per batch of 2 prompts, with each prompt's row once per sampled candidate
    assert sorted(i for b in PROBE_LOG["rows"] for i in b) == sorted(list(range(6)) * 2)
    assert all(len(b) == 4 and b[0] == b[1] and b[2] == b[3] for b in PROBE_LOG["rows"])
    for r in rows:
        assert len(r["candidates"]) == 2 and r["selection"] == {"chosen": 1, "rule": "second"}
        assert r["generation"] == r["candidates"][1]
    assert sum(r["candidates"][0] != r["candidates"][1] for r in rows) >= 3  # sampled
    # The marked user's rows were generated inside the backbone's model context: with the
    # stand-in adapter at strength 0 (a fresh cache), they change; the others do not.
    ProbeBackbone.strength = 0.0
    try:
        run([o if not o.startswith("cache_dir=") else f"cache_dir={tmp_path / 'c0'}" for o in ov],
            tmp_path / "zero")
    finally:
        ProbeBackbone.strength = 30.0
    zero = [json.loads(x) for x in
            (tmp_path / "zero" / "test_probe" / "predictions.jsonl").read_text().splitlines()]
    for r, z in zip(rows, zero):
        if r["user"] == "demo_user_00":
            assert r["candidates"] != z["candidates"]
        else:
            assert r["candidates"] == z["candidates"]


def test_the_generation_cache_key_carries_the_backbones_row_identity(tiny_overrides,
                                                                     tmp_path) -> None:
    ov = ["+exp=demo_compare", *tiny_overrides, "methods=[]", "backbone.name=test_probe",
          "steering=none", "generation.do_sample=true", "generation.temperature=1.0"]
    first = run(ov, tmp_path / "a")
    again = run(ov, tmp_path / "b")  # new run dir, same cache: everything reused
    assert again["methods"]["test_probe"]["n_cached"] == 6
    # The marked user's rows carry an identity; the others' keys are the plain prompt's
    # (so they are shared with any backbone that gives the same prompt, rightly).
    store = next((tmp_path / "cache" / "generations").glob("*.jsonl"))
    keys = {json.loads(x)["key"] for x in store.read_text().splitlines()}
    assert len(keys) == 12  # 6 rows x 2 candidates, each its own entry
    assert first["methods"]["test_probe"]["n_generated"] == 6


def test_an_overlong_prompt_stops_before_model_time_naming_the_sample(tiny_overrides, tmp_path,
                                                                      monkeypatch) -> None:
    import fints_repro.stages as stages
    from fints_repro.errors import DataError

    def forbidden(*a, **k):
        raise AssertionError("generated before checking prompt lengths")

    monkeypatch.setattr(hf_engine, "generate_batches", forbidden)
    ov = ["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: rag}]",
          "+model.arch_kwargs.max_position_embeddings=200"]
    with pytest.raises(DataError, match=r"sample '.+' \(user 'demo_user_\d+'\) has \d+ tokens.*"
                                        r"context of 200.*generation.overlength=truncate"):
        run(ov, tmp_path / "run")


def test_truncate_cuts_overlong_prompts_in_the_middle_to_fit(tiny_overrides, tmp_path) -> None:
    from fints_repro.models.chat import TRUNCATION_MARK

    ov = ["+exp=demo_compare", *tiny_overrides, "methods=[{backbone: rag}]",
          "+model.arch_kwargs.max_position_embeddings=200", "generation.overlength=truncate"]
    summary = run(ov, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "rag" / "predictions.jsonl")
            .read_text().splitlines()]
    from fints_repro.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cut = [r for r in rows if TRUNCATION_MARK in r["prompt"]]
    assert summary["methods"]["rag"]["n_prompts_truncated"] == len(cut) > 0
    for r in rows:
        assert len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= 200 - 6
    for r in cut:  # the start of the turn and its end (the task input's tail) are kept
        assert r["prompt"].rstrip().endswith("<|im_start|>assistant")


def test_paper_presets_run_the_authors_pipeline_and_fidelity_ours_switches_it_back() -> None:
    from fints_repro.steering import steering_schema

    ours = steering_schema()()
    for preset in ("lamp_news", "longlamp_abstract"):
        for m in _methods([f"+exp={preset}"]).values():
            assert {k: _get(m.steering, k) for k in AUTHORS} == AUTHORS, (preset, m.name)
            assert m.steering.fine_grained.retriever == "contriever"
        for m in _methods([f"+exp={preset}", "fidelity=ours"]).values():
            assert {k: _get(m.steering, k) for k in AUTHORS} == {k: _get(ours, k) for k in AUTHORS}
    demo = _methods(["+exp=demo_compare"])
    assert demo["rag+fine_grained"].steering.pairs.prompt_layout == "authors"
    assert demo["rag+fine_grained"].steering.pairs.max_new_tokens == 64
    assert demo["rag+fine_grained(ours)"].steering.pairs.prompt_layout == "compact"
    assert demo["rag+fine_grained(ours)"].steering.pairs.max_new_tokens is None
    assert demo["rag+caa(ours)"].steering.attn_read == "output"
    # make demo's preset is the ours half of demo_compare, method for method
    quick = _methods(["+exp=demo"])
    assert list(quick) == ["zero_shot", "rag", "rag+caa(ours)", "rag+fine_grained(ours)"]
    for name in ("rag+caa(ours)", "rag+fine_grained(ours)"):
        assert quick[name] == demo[name], name
