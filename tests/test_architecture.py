"""The shape every task, backbone and steering method plugs into:

- methods of a preset are composed by Hydra: a command-line ``steering.*`` override reaches
  every steered method, a method's own override wins;
- every config value is checked when the config is composed, with the key named, and
  the steered layer against the model's depth before the model is loaded;
- one registry kind for every component, failing on a duplicate name;
- the text-generation task's parsing, scores (per sample, aggregate, per type) and pair
  criterion against hand computations;
- the backbone lifecycle (fit → model context → N candidates → select) and a generation
  cache key that carries the backbone's row identity and the candidate index;
- a rerun into a run dir with a changed config never reuses that dir's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from fints_repro.compose import compose_run, resolve_methods
from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig
from fints_repro.data.schema import Sample
from fints_repro.errors import ConfigError
from fints_repro.tasks import build_task
from tests.conftest import run


# ------------------------------------------------------------------ methods through Hydra


def _methods(overrides: list[str]) -> dict:
    return {m.name: m for m in resolve_methods(compose_run(overrides), overrides)}


def test_a_command_line_steering_override_reaches_every_steered_method() -> None:
    for preset in ("demo", "lamp_news", "longlamp_abstract"):
        base = _methods([f"+exp={preset}"])
        moved = _methods([f"+exp={preset}", "steering.layer=7", "steering.fine_grained.top_k=2"])
        steered = [n for n, m in moved.items() if m.steering.name != "none"]
        assert {"rag+caa", "rag+fine_grained"} <= set(steered), preset
        for name in steered:
            assert moved[name].steering.layer == 7, (preset, name)
            assert base[name].steering.layer != 7
            assert moved[name].steering.fine_grained.top_k == 2
        # what the preset sets for its methods holds for all of them alike (the demo's
        # "(ours)" methods choose their own fidelity)
        assert len({(m.steering.layer, m.steering.attn_read) for n, m in base.items()
                    if n in steered and "(ours)" not in n}) == 1, preset


def test_a_methods_own_override_wins_over_the_command_line() -> None:
    ov = ["+exp=demo", "steering.layer=7", "backbone.k=2",
          "methods=[{backbone: rag, steering: caa, overrides: {steering.layer: 3}},"
          "{backbone: rag, steering: fine_grained}, {backbone: zero_shot}]"]
    m = _methods(ov)
    assert m["rag+caa"].steering.layer == 3 and m["rag+fine_grained"].steering.layer == 7
    assert m["rag+caa"].backbone.k == 2 and m["rag+fine_grained"].backbone.k == 2
    assert m["zero_shot"].backbone.name == "zero_shot"


@pytest.mark.parametrize("bad,match", [
    ("methods=[{backbone: rag, overrides: {dataset.n_users: 2}}]", "must start with"),
    ("methods=[{backbone: rag, overrides: {generation.postprocess: strip}}]", "whole run"),
    ("methods=[{backbone: rag, steering: nope}]", "no steering option .nope."),
    ("methods=[{backbone: rag},{backbone: rag}]", "duplicate method names"),
    ("methods=[{backbone: rag, steering: fine_grained, overrides: {steering.top_k: 2}}]", "top_k"),
])
def test_bad_method_lists_fail_at_start_up(bad: str, match: str) -> None:
    ov = ["+exp=demo", bad]
    with pytest.raises(ConfigError, match=match):
        resolve_methods(compose_run(ov), ov)


def test_a_method_decodes_with_its_own_generation_settings_and_nulls_are_the_checkpoints(
        tiny_overrides, tmp_path) -> None:
    """Decoding per method (the authors sample their steered rows at T = 0.1 and leave the
    unsteered ones to the checkpoint's generation config): a method's generation overrides
    hold for it alone, and null takes the checkpoint's value."""
    from fints_repro.models.generation import resolve_decoding
    from fints_repro.models.loading import load_model

    ov = ["+exp=demo", *tiny_overrides, "generation.do_sample=null", "generation.top_p=null",
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


def test_methods_need_the_overrides_their_config_was_composed_with() -> None:
    cfg = compose_run(["+exp=demo", "steering.layer=7"])
    with pytest.raises(ConfigError, match="overrides"):
        resolve_methods(cfg, None)
    with pytest.raises(ConfigError, match="differs"):
        resolve_methods(cfg, ["+exp=demo"])


def test_a_flat_method_setting_is_no_longer_a_steering_key() -> None:
    with pytest.raises(Exception, match="top_k"):
        compose_run(["steering=fine_grained", "steering.top_k=3"])
    assert compose_run(["steering=fine_grained", "steering.fine_grained.top_k=3"]
                       ).steering.fine_grained.top_k == 3


# ------------------------------------------------------------------ start-up validation


@pytest.mark.parametrize("override,key", [
    ("generation.batch_size=0", "generation.batch_size"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("generation.top_p=1.5", "generation.top_p"),
    ("dataset.max_new_tokens=-1", "dataset.max_new_tokens"),
    ("dataset.history_fraction=1.5", "dataset.history_fraction"),
    ("dataset.history_fraction=0", "dataset.history_fraction"),
    ("dataset.n_users=0", "dataset.n_users"),
    ("dataset.pair_rouge_threshold=2", "dataset.pair_rouge_threshold"),
    ("backbone.k=-1", "backbone.k"),
    ("eval.bootstrap=-5", "eval.bootstrap"),
    ("model.dtype=float8", "model.dtype"),
    ("model.device=gpu", "model.device"),
    ("steering.layer=-2", "steering.layer"),
    ("steering.alpha=nan", "steering.alpha"),
    ("steering.beta=inf", "steering.beta"),
    ("steering.sites=[attn,ffn]", "steering.sites"),
    ("steering.positions=middle", "steering.positions"),
    ("steering.attn_read=foo", "steering.attn_read"),
    ("steering.answer_tokenization=chars", "steering.answer_tokenization"),
    ("steering.fine_grained.top_k=0", "steering.fine_grained.top_k"),
    ("steering.fine_grained.tau=0", "steering.fine_grained.tau"),
    ("steering.fine_grained.aggregate=max", "steering.fine_grained.aggregate"),
    ("steering.pairs.attempts=0", "steering.pairs.attempts"),
    ("steering.extract_batch_size=0", "steering.extract_batch_size"),
])
def test_every_bad_value_is_named_when_the_config_is_composed(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_run([override])


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
        run(["+exp=demo", *tiny_overrides, override], tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------ registries


def test_every_component_kind_has_one_registry_that_finds_its_plugins_by_itself() -> None:
    """Each registry imports its package's modules on first use: every built-in plug-in is
    there without a list of imports; a duplicate names both places; a miss suggests the
    near names."""
    from fints_repro.backbones import BACKBONES
    from fints_repro.data.load import LOADERS
    from fints_repro.eval.metrics import METRICS
    from fints_repro.eval.postprocess import POSTPROCESS
    from fints_repro.retrieval.base import RETRIEVERS
    from fints_repro.steering import STEERING
    from fints_repro.tasks import TASKS
    from fints_repro.tracking import TRACKERS

    expected = {TASKS: ["function_calling", "text_gen"],
                BACKBONES: ["lora", "rag", "reward_model", "zero_shot"],
                STEERING: ["bipo", "caa", "fine_grained", "none", "steerx"],
                METRICS: ["meteor", "rouge"], POSTPROCESS: ["fints_first_line", "strip"],
                RETRIEVERS: ["bm25", "contriever", "dense", "minilm"],
                LOADERS: ["demo", "demo_pwab", "lamp", "longlamp", "pwab"],
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


def test_a_registry_imports_every_module_of_its_package_once(tmp_path, monkeypatch) -> None:
    from fints_repro.registry import Registry

    pkg = tmp_path / "plugins_for_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from fints_repro.registry import Registry\n"
                                     "R = Registry('widget', package='plugins_for_test')\n")
    for name in ("alpha", "beta"):
        (pkg / f"{name}.py").write_text(f"from plugins_for_test import R\n"
                                        f"IMPORTS = globals().get('IMPORTS', 0) + 1\n"
                                        f"@R.register('{name}')\ndef make():\n    return '{name}'\n")
    (pkg / "_helper.py").write_text("raise RuntimeError('a private module is not a plug-in')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    R = importlib.import_module("plugins_for_test").R
    assert isinstance(R, Registry) and R._items == {}  # nothing imported yet
    assert R.get("beta")() == "beta" and R.names() == ["alpha", "beta"]
    assert R.get("alpha")() == "alpha"  # a second lookup imports nothing again
    assert importlib.import_module("plugins_for_test.alpha").IMPORTS == 1


# ------------------------------------------------------------------ the text-generation task


def _task(**dataset):
    d = DatasetConfig(name="t", loader="demo", task="demo_news", path="x", **dataset)
    return build_task(d, GenerationConfig(postprocess="fints_first_line"), EvalConfig(bootstrap=0))


def test_text_gen_task_parses_scores_and_judges_pairs_as_computed_by_hand() -> None:
    task = _task(metrics=["rouge"], pair_rouge_threshold=0.4)
    assert task.metric_names == ("rouge1", "rougeL") and task.primary_metric == "rougeL"
    assert task.parse("the headline: x\n\n the cat sat \nmore") == "the cat sat"
    samples = [Sample("a", "u", "in", "the cat sat on the mat", type="short"),
               Sample("b", "u", "in", "a dog ran far away", type="long"),
               Sample("c", "u", "in", "a dog ran", type="short")]
    preds = ["the cat sat", "a dog ran far away", "nothing alike"]
    scores = task.score(preds, samples, seed=0)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    want = [scorer.score(s.target, p) for s, p in zip(samples, preds)]
    for row, w in zip(scores.per_sample, want):
        assert row["rouge1"] == pytest.approx(w["rouge1"].fmeasure)
        assert row["rougeL"] == pytest.approx(w["rougeL"].fmeasure)
    assert scores.aggregate["n"] == 3
    assert scores.aggregate["rougeL"] == pytest.approx(sum(w["rougeL"].fmeasure for w in want) / 3)
    short = [want[0]["rougeL"].fmeasure, want[2]["rougeL"].fmeasure]
    assert scores.aggregate["short/rougeL"] == pytest.approx(sum(short) / 2)
    assert scores.aggregate["short/n"] == 2 and scores.aggregate["long/n"] == 1
    assert scores.aggregate["long/rouge1"] == pytest.approx(1.0)
    # the pair criterion: ROUGE-L F(rejected, chosen) below the dataset's threshold
    keep = task.accept_pair("the cat sat on the mat", "a dog ran")
    drop = task.accept_pair("the cat sat on the mat", "the cat sat on a mat")
    assert keep.keep and keep.score == pytest.approx(0.0)
    assert not drop.keep and drop.score == pytest.approx(
        scorer.score("the cat sat on the mat", "the cat sat on a mat")["rougeL"].fmeasure)
    assert task.describe() == {"name": "text_gen", "metrics": ["rouge1", "rougeL"],
                               "primary": "rougeL"}
    # with the authors' implementation: the `rouge` package's ROUGE-L, and no pair for a
    # text it cannot score
    from rouge import Rouge

    from fints_repro.config import PairsConfig

    theirs = PairsConfig(rouge_impl="rouge")
    v = task.accept_pair("The cat sat. On the mat.", "the cat sat on a mat", theirs)
    want = Rouge().get_scores("the cat sat on a mat", "The cat sat. On the mat.")[0]["rouge-l"]["f"]
    assert v.score == pytest.approx(want) and v.keep == (want < 0.4)
    assert not task.accept_pair("The cat sat.", "...", theirs).keep


def test_a_run_records_its_task_and_reports_read_metric_names_from_it(tiny_overrides,
                                                                      tmp_path) -> None:
    summary = run(["+exp=demo", *tiny_overrides, "methods=[{backbone: zero_shot}]"],
                  tmp_path / "run")
    assert summary["task"] == {"name": "text_gen", "metrics": ["rouge1", "rougeL"],
                               "primary": "rougeL"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["task"]["primary"] == "rougeL"


# ------------------------------------------------------------------ rerun into a run dir


def _generations(run_dir: Path, method: str) -> list[str]:
    return [json.loads(x)["generation"]
            for x in (run_dir / method / "predictions.jsonl").read_text().splitlines()]


def test_a_rerun_with_a_changed_config_never_reuses_the_run_dirs_rows(tiny_overrides,
                                                                      tmp_path) -> None:
    base = [o for o in tiny_overrides if not o.startswith("cache_dir=")]

    def go(cache: str, tokens: int, run_dir: str) -> dict:
        return run(["+exp=demo", *base, f"cache_dir={tmp_path / cache}",
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


# ------------------------------------------------------------------ the backbone lifecycle

from fints_repro.backbones import BACKBONES, Backbone, Prompt  # noqa: E402
from fints_repro.steering.hooks import steer  # noqa: E402

PROBE_LOG: dict[str, list] = {}


@BACKBONES.register("test_probe")
class ProbeBackbone(Backbone):
    """A backbone that exercises every lifecycle step: it 'fits' per user, adapts the model
    for the users of a batch (a large residual vector for users it marks, standing in for
    an adapter), samples 2 candidates and selects the second."""

    name = "test_probe"
    n_candidates = 2
    strength = 30.0  # of the stand-in adapter

    def fit(self, lm, samples, resources, steering=None):
        PROBE_LOG.setdefault("fit", []).append(sorted({s.user for s in samples}))
        self.samples = list(samples)
        self.marked = {sorted({s.user for s in samples})[0]}

    def build_prompts(self, samples):
        return [Prompt(s.input) for s in samples]

    def model_context(self, lm, rows):
        PROBE_LOG.setdefault("rows", []).append(list(rows))
        import torch

        H = lm.model.config.hidden_size
        v = torch.zeros(len(rows), H)
        for j, i in enumerate(rows):
            if self.samples[i].user in self.marked:
                v[j] = self.strength
        return steer(lm.model, {(1, "resid"): v})

    def row_identity(self, i):
        user = self.samples[i].user
        return f"adapter-of-{user}-{self.strength}" if user in self.marked else ""

    def select(self, samples, candidates):
        return [1] * len(candidates), [{"rule": "second"} for _ in candidates]


def test_backbone_lifecycle_fit_context_candidates_select(tiny_overrides, tmp_path) -> None:
    PROBE_LOG.clear()
    ov = ["+exp=demo", *tiny_overrides, "methods=[]", "backbone.name=test_probe",
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
    ov = ["+exp=demo", *tiny_overrides, "methods=[]", "backbone.name=test_probe",
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


# ------------------------------------------------------------------ context length


def test_an_overlong_prompt_stops_before_model_time_naming_the_sample(tiny_overrides, tmp_path,
                                                                      monkeypatch) -> None:
    import fints_repro.pipeline as pipeline
    from fints_repro.errors import DataError

    def forbidden(*a, **k):
        raise AssertionError("generated before checking prompt lengths")

    monkeypatch.setattr(pipeline, "generate_batches", forbidden)
    ov = ["+exp=demo", *tiny_overrides, "methods=[{backbone: rag}]",
          "+model.arch_kwargs.max_position_embeddings=200"]
    with pytest.raises(DataError, match=r"sample '.+' \(user 'demo_user_\d+'\) has \d+ tokens.*"
                                        r"context of 200.*generation.overlength=truncate"):
        run(ov, tmp_path / "run")


def test_truncate_cuts_overlong_prompts_in_the_middle_to_fit(tiny_overrides, tmp_path) -> None:
    from fints_repro.models.chat import TRUNCATION_MARK

    ov = ["+exp=demo", *tiny_overrides, "methods=[{backbone: rag}]",
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


# ------------------------------------------------------------------ pairs from the train split


def test_train_split_items_are_what_the_authors_make_pairs_from(tmp_path) -> None:
    """LaMP: each training sample (its full input, its gold output); LongLaMP: each training
    row's query and its profile items (fixtures in the official formats)."""
    from fints_repro.pipeline import Resources
    from tests.conftest import FIXTURES

    cfg = compose_run(["dataset=lamp_news", f"data.root={FIXTURES}", "steering.pairs.source=train_samples"])
    items = Resources(cfg, None, None).train_items()
    questions = json.loads((FIXTURES / "lamp4" / "train_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in
             json.loads((FIXTURES / "lamp4" / "train_outputs.json").read_text())["golds"]}
    want: dict[str, list[tuple[str, str, str]]] = {}
    for q in questions:
        want.setdefault(q["user_id"], []).append((q["id"], q["input"], golds[q["id"]]))
    assert {u: [(h.id, h.input, h.output) for h in hs] for u, hs in items.items()} == want

    cfg = compose_run(["dataset=longlamp_abstract", f"data.root={FIXTURES}"])
    items = Resources(cfg, None, None).train_items()
    rows = [json.loads(x) for x in
            (FIXTURES / "longlamp_abstract" / "train.jsonl").read_text().splitlines()]
    for user in {r["name"] for r in rows}:
        mine = [r for r in rows if r["name"] == user]
        outputs = {h.output for h in items[user]}
        assert {r["output"] for r in mine} <= outputs
        assert {p["abstract"] for r in mine for p in r["profile"]} <= outputs
        assert len(items[user]) == len(mine) + len({p["id"] for r in mine for p in r["profile"]})


# ------------------------------------------------------------------ fidelity switch


AUTHORS = {"attn_read": "residual", "answer_tokenization": "joint",
           "pairs.prompt_layout": "authors", "pairs.rouge_impl": "rouge",
           "pairs.question": "generation_prompt", "pairs.source": "train_samples",
           "pairs.max_new_tokens": 1024}


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_paper_presets_run_the_authors_pipeline_and_fidelity_ours_switches_it_back() -> None:
    from fints_repro.steering import steering_schema

    ours = steering_schema()()
    for preset in ("lamp_news", "longlamp_abstract"):
        for m in _methods([f"+exp={preset}"]).values():
            assert {k: _get(m.steering, k) for k in AUTHORS} == AUTHORS, (preset, m.name)
            assert m.steering.fine_grained.retriever == "contriever"
        for m in _methods([f"+exp={preset}", "fidelity=ours"]).values():
            assert {k: _get(m.steering, k) for k in AUTHORS} == {k: _get(ours, k) for k in AUTHORS}
    demo = _methods(["+exp=demo"])
    assert demo["rag+fine_grained"].steering.pairs.prompt_layout == "authors"
    assert demo["rag+fine_grained(ours)"].steering.pairs.prompt_layout == "compact"
    assert demo["rag+fine_grained(ours)"].steering.pairs.max_new_tokens is None
    assert demo["rag+caa(ours)"].steering.attn_read == "output"
