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


# ------------------------------------------------------------------ methods through Hydra


def _methods(overrides: list[str]) -> dict:
    return {m.name: m for m in resolve_methods(compose_run(overrides), overrides)}


def test_a_command_line_steering_override_reaches_every_steered_method() -> None:
    for preset in ("demo_compare", "lamp_news", "longlamp_abstract"):
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
    ov = ["+exp=demo_compare", "steering.layer=7", "backbone.k=2",
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
    ov = ["+exp=demo_compare", bad]
    with pytest.raises(ConfigError, match=match):
        resolve_methods(compose_run(ov), ov)


def test_methods_need_the_overrides_their_config_was_composed_with() -> None:
    cfg = compose_run(["+exp=demo_compare", "steering.layer=7"])
    with pytest.raises(ConfigError, match="overrides"):
        resolve_methods(cfg, None)
    with pytest.raises(ConfigError, match="differs"):
        resolve_methods(cfg, ["+exp=demo_compare"])


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
    ("steering.fine_grained.temperature=0", "steering.fine_grained.temperature"),
    ("steering.fine_grained.aggregate=max", "steering.fine_grained.aggregate"),
    ("steering.pairs.attempts=0", "steering.pairs.attempts"),
    ("steering.extract_batch_size=0", "steering.extract_batch_size"),
])
def test_every_bad_value_is_named_when_the_config_is_composed(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_run([override])


# ------------------------------------------------------------------ registries


def test_a_registry_imports_every_module_of_its_package_once(tmp_path, monkeypatch) -> None:

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
    assert R._items == {}  # nothing imported yet
    assert R.get("beta")() == "beta" and R.names() == ["alpha", "beta"]
    assert R.get("alpha")() == "alpha"  # a second lookup imports nothing again
    assert importlib.import_module("plugins_for_test.alpha").IMPORTS == 1


# ------------------------------------------------------------------ the text-generation task


def _task(**dataset):
    d = DatasetConfig(name="t", loader="demo", benchmark="demo_news", path="x", **dataset)
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


# ------------------------------------------------------------------ rerun into a run dir


def _generations(run_dir: Path, method: str) -> list[str]:
    return [json.loads(x)["generation"]
            for x in (run_dir / method / "predictions.jsonl").read_text().splitlines()]


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


# ------------------------------------------------------------------ context length


# ------------------------------------------------------------------ pairs from the train split


def test_train_split_items_are_what_the_authors_make_pairs_from(tmp_path) -> None:
    """LaMP: each training sample (its full input, its gold output); LongLaMP: each training
    row's query and its profile items (fixtures in the official formats)."""
    from fints_repro.stages import RunContext
    from tests.conftest import FIXTURES

    cfg = compose_run(["dataset=lamp_news", f"data.root={FIXTURES}", "steering.pairs.source=train_samples"])
    items = RunContext(cfg, None, []).train_items()
    questions = json.loads((FIXTURES / "lamp4" / "train_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in
             json.loads((FIXTURES / "lamp4" / "train_outputs.json").read_text())["golds"]}
    want: dict[str, list[tuple[str, str, str]]] = {}
    for q in questions:
        want.setdefault(q["user_id"], []).append((q["id"], q["input"], golds[q["id"]]))
    assert {u: [(h.id, h.input, h.output) for h in hs] for u, hs in items.items()} == want

    cfg = compose_run(["dataset=longlamp_abstract", f"data.root={FIXTURES}"])
    items = RunContext(cfg, None, []).train_items()
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
           "pairs.extraction_prompt": "generation_prompt", "pairs.source": "train_samples",
           "pairs.max_new_tokens": 1024}


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


