"""Every config value checked at start-up, before any data or model is loaded.

``RunConfig.__post_init__`` calls :func:`check_run_config`, so a composed config that
``OmegaConf.to_object`` turns into a ``RunConfig`` is already checked: a bad value stops
the run with a ``ConfigError`` that names its key (``generation.batch_size=0: must be at
least 1``). Names of registered components (tasks, backbones, steering methods, metrics,
post-processing rules, retrievers, loaders, trackers) are checked against their
registries where the run is composed (``compose.check_names``); the steered layer
against the model's depth by :func:`check_layer` once the model's config (not its
weights) is known.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any, Iterable

from fints_repro.errors import ConfigError
from fints_repro.text import pattern

if TYPE_CHECKING:
    from fints_repro.config import DatasetConfig, ModelConfig, RunConfig, SteeringConfig, TrainConfig

POSITIONS = ("all", "prompt", "generated")
SITES = ("resid", "attn", "mlp")
ATTN_READS = ("output", "residual")
ANSWER_TOKENIZATIONS = ("separate", "joint")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGGER_MODES = ("offline", "online", "disabled")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value!r}: {why}")


def at_least(key: str, value: Any, low: float, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= low:
        fail(key, value, f"must be at least {low}")


def positive(key: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(key, value, "must be a positive number")


def finite(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, value, "must be a finite number")


def in_range(key: str, value: Any, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        fail(key, value, f"must be in {left}{low}, {high}{right}")


def one_of(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        fail(key, value, f"expected one of {allowed}")


def check_steering(s: "SteeringConfig", prefix: str = "steering") -> None:
    """The steering values that need no model: sites, positions, strengths, pairs, and each
    method's own node (its settings' ``check(key, steering)``)."""
    if s.layer is not None and s.layer < 0:
        fail(f"{prefix}.layer", s.layer, "is outside the model (layers count from 0)")
    if not s.sites:
        fail(f"{prefix}.sites", list(s.sites), "is empty: name at least one site")
    for site in s.sites:
        if site not in SITES:
            fail(f"{prefix}.sites", site, f"unknown site; expected one of {list(SITES)}")
    if len(set(s.sites)) != len(s.sites):
        fail(f"{prefix}.sites", list(s.sites), "names a site twice")
    for name in ("alpha", "beta", "gamma", "scale"):
        finite(f"{prefix}.{name}", getattr(s, name))
    one_of(f"{prefix}.positions", s.positions, POSITIONS)
    one_of(f"{prefix}.attn_read", s.attn_read, ATTN_READS)
    one_of(f"{prefix}.answer_tokenization", s.answer_tokenization, ANSWER_TOKENIZATIONS)
    at_least(f"{prefix}.extract_batch_size", s.extract_batch_size, 1)
    p = s.pairs
    at_least(f"{prefix}.pairs.attempts", p.attempts, 1)
    at_least(f"{prefix}.pairs.k_other", p.k_other, 1, optional=True)
    at_least(f"{prefix}.pairs.batch_size", p.batch_size, 1)
    positive(f"{prefix}.pairs.temperature", p.temperature)
    one_of(f"{prefix}.pairs.call_serialisation", p.call_serialisation, ("same", "authors"))
    check_nodes(s, prefix)


def check_nodes(cfg: Any, prefix: str) -> None:
    """Each plug-in's own node of a group config (a field whose value has
    ``check(key, group_config)``), by its own check."""
    for f in dataclasses.fields(cfg):
        node = getattr(cfg, f.name)
        if callable(getattr(node, "check", None)):
            node.check(f"{prefix}.{f.name}", cfg)


def check_train(t: "TrainConfig", prefix: str) -> None:
    positive(f"{prefix}.lr", t.lr)
    positive(f"{prefix}.epochs", t.epochs)
    at_least(f"{prefix}.batch_size", t.batch_size, 1)
    at_least(f"{prefix}.weight_decay", t.weight_decay, 0)
    # the share of the steps spent warming up; 1 would never reach the learning rate
    in_range(f"{prefix}.warmup_ratio", t.warmup_ratio, 0, 1, high_open=True)
    positive(f"{prefix}.max_grad_norm", t.max_grad_norm)
    at_least(f"{prefix}.max_length", t.max_length, 2)


def has_placeholders(key: str, template: str, names: Iterable[str]) -> None:
    missing = [n for n in names if "{" + n + "}" not in template]
    if missing:
        fail(key, template, f"lacks the placeholder(s) {', '.join('{' + n + '}' for n in missing)}")


def check_pwab(d: "DatasetConfig") -> None:
    w, demo = d.pwab, d.demo_pwab
    at_least("dataset.pwab.min_train_tasks", w.min_train_tasks, 1, optional=True)
    one_of("dataset.pwab.parse", w.parse, ("lenient", "strict"))
    one_of("dataset.pwab.recommender", w.recommender, ("cooccurrence", "sasrec"))
    if w.recommender == "sasrec" and not (w.sasrec_checkpoint and w.sasrec_item_ids):
        fail("dataset.pwab.recommender", w.recommender,
              "needs dataset.pwab.sasrec_checkpoint and dataset.pwab.sasrec_item_ids")
    for key in ("search_k", "recommend_k", "max_sequence"):
        at_least(f"dataset.pwab.{key}", getattr(w, key), 1)
    positive("dataset.pwab.bm25_k1", w.bm25_k1)
    in_range("dataset.pwab.bm25_b", w.bm25_b, 0, 1)
    in_range("dataset.pwab.search_threshold", w.search_threshold, 0, 1)
    in_range("dataset.pwab.review_threshold", w.review_threshold, -1, 1)
    at_least("dataset.pwab.review_max_tokens", w.review_max_tokens, 1, optional=True)
    one_of("dataset.pwab.sequence_as_string", w.sequence_as_string, ("bad_argument", "empty_results"))
    one_of("dataset.pwab.hit", w.hit, ("asin", "substring"))
    for key in ("n_users", "n_history", "n_test_tasks"):
        at_least(f"dataset.demo_pwab.{key}", getattr(demo, key), 1)
    for key in ("n_background_users", "n_train_tasks"):
        at_least(f"dataset.demo_pwab.{key}", getattr(demo, key), 0)


def check_run_config(cfg: "RunConfig") -> None:
    d, g, m = cfg.dataset, cfg.generation, cfg.model
    at_least("generation.batch_size", g.batch_size, 1)
    at_least("generation.max_new_tokens", g.max_new_tokens, 1, optional=True)
    positive("generation.temperature", g.temperature, optional=True)  # null: the checkpoint's
    if g.top_p is not None:
        in_range("generation.top_p", g.top_p, 0, 1, low_open=True)
    one_of("generation.overlength", g.overlength, ("error", "truncate"))
    one_of("engine.steered", cfg.engine.steered, ("refuse", "hf"))
    check_nodes(cfg.engine, "engine")
    at_least("dataset.max_new_tokens", d.max_new_tokens, 1)
    at_least("dataset.rag_k", d.rag_k, 0)
    at_least("dataset.n_users", d.n_users, 1, optional=True)
    at_least("dataset.max_samples_per_user", d.max_samples_per_user, 1, optional=True)
    one_of("dataset.users_from", d.users_from, ("eval_split", "both_splits", "unseen"))
    at_least("dataset.n_seen_users", d.n_seen_users, 1, optional=True)
    if d.users_from != "eval_split" and d.train_split == d.split:
        fail("dataset.users_from", d.users_from,
              f"compares the evaluation split with the training split, and both are {d.split!r} "
              "(dataset.train_split)")
    in_range("dataset.history_fraction", d.history_fraction, 0, 1, low_open=True)
    in_range("dataset.pair_rouge_threshold", d.pair_rouge_threshold, 0, 1)
    at_least("dataset.pair_k_other", d.pair_k_other, 1)
    at_least("dataset.history_max_words", d.history_max_words, 1, optional=True)
    if d.users is not None and not d.users:
        fail("dataset.users", [], "is empty (null selects every user)")
    if not d.metrics:
        fail("dataset.metrics", [], "must name at least one metric")
    for key, regex in (("dataset.query_regex", d.query_regex),
                       ("dataset.pair_answer_regex", d.pair_answer_regex)):
        if regex is not None and pattern(regex, key, dotall=key == "dataset.query_regex").groups < 1:
            fail(key, regex, "has no group: group 1 of its first match is what is kept")
    has_placeholders("dataset.zero_shot_template", d.zero_shot_template, ["input"])
    at_least("backbone.k", cfg.backbone.k, 0, optional=True)
    one_of("backbone.memory", cfg.backbone.memory, ("retrieved", "last"))
    check_pwab(d)
    check_nodes(cfg.backbone, "backbone")
    at_least("eval.bootstrap", cfg.eval.bootstrap, 0)
    at_least("eval.max_read_chars", cfg.eval.max_read_chars, 1)
    at_least("threads", cfg.threads, 1, optional=True)
    at_least("shard.count", cfg.shard.count, 1)
    in_range("shard.index", cfg.shard.index, 0, cfg.shard.count, high_open=True)
    one_of("model.dtype", m.dtype, DTYPES)
    if not _DEVICE.match(m.device):
        fail("model.device", m.device, "expected auto, cpu, mps, cuda or cuda:N")
    check_device_map(m, cfg.engine.name)
    one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    at_least("logger.n_table_rows", cfg.logger.n_table_rows, 0)
    check_steering(cfg.steering)
    for i, spec in enumerate(cfg.methods):
        if not spec.backbone:
            fail(f"methods[{i}].backbone", spec.backbone, "names no backbone")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_MAPPED_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|\d+)$")


def check_device_map(m: "ModelConfig", engine: str) -> None:
    """``model.device_map``: null, a strategy name, or {module name: device}."""
    dm = m.device_map
    if dm is None:
        return
    if engine != "hf":
        fail("model.device_map", dm, f"is for engine=hf; engine={engine} splits a model with its "
             "own settings (vLLM: engine.vllm.tensor_parallel_size)")
    if isinstance(dm, str):
        one_of("model.device_map", dm, DEVICE_MAPS)
        return
    if not hasattr(dm, "items") or not dm:
        fail("model.device_map", dm, f"expected one of {list(DEVICE_MAPS)} or a non-empty "
             "mapping {module name: device}")
    for name, device in dm.items():
        if not _MAPPED_DEVICE.match(str(device)):
            fail(f"model.device_map.{name}", device, "expected cpu, disk, mps, cuda:N or a GPU index")


def check_layer(layer: int | None, n_layers: int, key: str = "steering.layer") -> None:
    if layer is not None and not 0 <= layer < n_layers:
        fail(key, layer, f"is outside the model (layers 0..{n_layers - 1})")
