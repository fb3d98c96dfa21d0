"""The run, stage by stage: config checks → data → model → (per method) backbone fit →
prompts → steering plan → generations → selection → parsing → scores.

Every stage is a plain function of plain data. Generations are cached on disk by content
hash (model fingerprint, decoding settings, prompt, the backbone's row identity, the
candidate index and the row's steering vectors), appended batch by batch, so a killed run
resumes where it stopped and an identical rerun costs no model time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from fints_repro.backbones import Backbone, Prompt, build_backbone
from fints_repro.cache import (
    GenerationStore,
    append_jsonl,
    content_hash,
    make_dir,
    read_jsonl_lenient,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from fints_repro.checks import check_layer
from fints_repro.compose import Method, check_names, compose_group, resolve_methods
from fints_repro.config import ModelConfig, RunConfig, SteeringConfig
from fints_repro.data.load import SplitReader, load_samples, whole_split
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import DataError
from fints_repro.models.chat import fit_chat_prompts
from fints_repro.models.generation import generate_batches, resolve_decoding
from fints_repro.models.inspect import shape_from_config, shape_of
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.report import FAILED, INTERRUPTED, markdown
from fints_repro.retrieval import Retriever, build_retriever
from fints_repro.steering import STEERING, SteeringInputs
from fints_repro.tasks import Task, build_task
from fints_repro.tracking import open_tracker

log = logging.getLogger(__name__)

__all__ = ["Method", "run_experiment", "run_method"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Resources:
    """Built on first use and shared by every method of a run: the retriever, the users'
    training-split items, and models other than the run's own (e.g. a separate pair
    generator). ``lm``, the run's model, may be set after the checks that need none."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel | None, task: Task,
                 overrides: Sequence[str] = (), reader: SplitReader | None = None):
        self.cfg, self.lm, self.task, self.overrides = cfg, lm, task, list(overrides)
        self.reader = reader or SplitReader()
        self._retrievers: dict[str | None, Retriever] = {}
        self._models: dict[str, LoadedModel] = {}
        self._train_items: dict[str, list[HistoryItem]] | None = None

    def retriever(self, name: str | None = None) -> Retriever:
        """The run's retriever, or the ``retriever`` group option ``name`` (built once)."""
        if name == self.cfg.retriever.name:
            name = None
        if name not in self._retrievers:
            rcfg = self.cfg.retriever if name is None else compose_group(self.overrides, "retriever", name)
            self._retrievers[name] = build_retriever(rcfg)
        return self._retrievers[name]

    def model(self, name: str | None) -> LoadedModel:
        if name is None or name == self.cfg.model.name:
            if self.lm is None:
                raise RuntimeError("the run's model is asked for before it was loaded")
            return self.lm
        if name not in self._models:
            mcfg: ModelConfig = compose_group(self.overrides, "model", name)
            self._models[name] = with_task_system_prompt(load_model(mcfg, self.cfg.cache_dir),
                                                         self.cfg.dataset.system_prompt)
        return self._models[name]

    def train_items(self) -> dict[str, list[HistoryItem]]:
        """Per user, the items of the dataset's training split (steering.pairs.source=
        train_samples, as the authors' code): each training sample's (input, gold output),
        and with ``dataset.train_items_with_profile`` its profile items too. Read once."""
        if self._train_items is None:
            d = self.cfg.dataset
            items: dict[str, dict[str, HistoryItem]] = {}
            for s in load_samples(whole_split(d, d.train_split), seed=self.cfg.seed,
                                  reader=self.reader):
                mine = items.setdefault(s.user, {})
                if s.target is not None:  # meta: the task behind the item (function calling)
                    mine.setdefault(s.id, HistoryItem(s.id, s.input, s.target, s.timestamp,
                                                      meta={"sample": s}))
                if d.train_items_with_profile:
                    for h in s.history:
                        mine.setdefault(h.id, h)
            self._train_items = {u: list(v.values()) for u, v in items.items()}
            log.info("pairs from the %r split: %d items of %d users", d.train_split,
                     sum(map(len, self._train_items.values())), len(self._train_items))
        return self._train_items

    def steering_inputs(self, steering: SteeringConfig) -> SteeringInputs:
        return SteeringInputs(
            dataset=self.cfg.dataset, task=self.task, cache_dir=self.cfg.cache_dir,
            seed=self.cfg.seed, retriever=self.retriever,
            generator=lambda: self.model(steering.pairs.generator),
            layers_path=self.cfg.model.layers_path, progress=self.cfg.progress,
            pair_items=self.train_items, overlength=self.cfg.generation.overlength,
        )


def check_pair_sources(cfg: RunConfig, methods: Sequence[Method], samples: Sequence[Sample],
                       resources: Resources) -> None:
    """Before any model time: methods that make pairs from the users' training-split
    samples (``steering.pairs.source=train_samples``) need evaluated users who have some.
    None at all is an error naming the splits and the counts (every steered row would
    silently equal its backbone's); some without is a warning with the count."""
    def makes_pairs(m: Method) -> bool:
        return m.steering.name != "none" or m.backbone.name == "reward_model"

    needing = [m.name for m in methods if makes_pairs(m) and m.steering.pairs.source == "train_samples"]
    if not needing:
        return
    d = cfg.dataset
    items = resources.train_items()
    users = sorted({s.user for s in samples})
    without = [u for u in users if not items.get(u)]
    where = (f"of the {len(users)} evaluated users (split {d.split!r}), {len(without)} have no "
             f"sample in the training split {d.train_split!r} "
             f"({sum(map(len, items.values()))} items of {len(items)} users)")
    if len(without) == len(users):
        raise DataError(
            f"{', '.join(needing)} make pairs from the users' training-split samples "
            f"(steering.pairs.source=train_samples), and {where}: no pair can be made. A "
            "user-based split keeps its users apart; use one whose users are in both (LaMP's "
            "time-based split), dataset.users_from=both_splits, or steering.pairs.source=profile",
            file=d.path)
    if without:
        log.warning("pairs: %s; they get no pairs (their steered rows equal the backbone's)", where)


def with_task_system_prompt(lm: LoadedModel, system_prompt: str | None) -> LoadedModel:
    """``lm`` whose chat prompts start with the task's system prompt (``dataset.
    system_prompt``: function calling's rules and tools), then the model's own."""
    if not system_prompt:
        return lm
    both = system_prompt if not lm.system_prompt else f"{system_prompt}\n\n{lm.system_prompt}"
    return dataclasses.replace(lm, system_prompt=both)


def _row_key(store_key: str, text: str, digest: str, identity: str, candidate: int | None) -> str:
    """Everything that decides one generated text, hashed. Unsteered, plain rows of one
    candidate keep the key they always had (so existing caches stay valid)."""
    parts = [text]
    if digest:
        parts.append(digest)
    if identity:
        parts.append("backbone:" + identity)
    if candidate is not None:
        parts.append(f"candidate:{candidate}")
    return GenerationStore.key("\0".join(parts))


def _combined_context(contexts: Sequence[Callable[[list[int]], ContextManager] | None]):
    """One per-batch context that enters each of ``contexts`` (backbone, then steering) and
    yields the union of the generate keyword arguments they yield."""
    active = [c for c in contexts if c is not None]
    if not active:
        return None

    @contextlib.contextmanager
    def ctx(rows: list[int]) -> Iterator[dict[str, Any]]:
        with contextlib.ExitStack() as stack:
            extra: dict[str, Any] = {}
            for c in active:
                got = stack.enter_context(c(rows))
                if isinstance(got, dict):
                    extra.update(got)
            yield extra

    return ctx


def fit_prompts(lm: LoadedModel, samples: Sequence[Sample], prompts: Sequence[Prompt],
                max_new_tokens: int, overlength: str, method: str) -> tuple[list[str], int]:
    """The chat-rendered prompts, checked against the model's context before any model time:
    a prompt whose tokens plus ``max_new_tokens`` exceed it stops the run naming the sample
    (``overlength=error``) or is cut in its middle (``truncate``; counted and logged)."""
    def too_long(i: int, n: int) -> Exception:
        return DataError(
            f"[{method}] the prompt of sample {samples[i].id!r} (user {samples[i].user!r}) has "
            f"{n} tokens; with {max_new_tokens} new tokens it exceeds the model's context of "
            f"{limit}. Set generation.overlength=truncate to cut such prompts in the middle, "
            "or shorten them (dataset.history_max_words, backbone.k, generation.max_new_tokens).",
            record=samples[i].id)

    limit = shape_of(lm.model).max_positions
    texts, over = fit_chat_prompts(lm.tokenizer, [p.text for p in prompts], lm.system_prompt,
                                   limit, max_new_tokens, overlength, too_long)
    if over:
        log.warning("[%s] %d prompt(s) longer than the context (%d tokens with %d new) were "
                    "cut in the middle", method, len(over), limit, max_new_tokens)
    return texts, len(over)


def run_method(
    cfg: RunConfig, method: Method, lm: LoadedModel, samples: Sequence[Sample],
    run_dir: Path, resources: Resources,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Backbone fit → prompts → (steering plan) → N candidates per row (cached, resumable)
    → selection → parsing → scores, for one method."""
    backbone = build_backbone(method.backbone, resources.task, resources.retriever)
    try:
        return _run_method(cfg, method, lm, samples, run_dir, resources, backbone)
    finally:
        backbone.close(lm)


def _run_method(
    cfg: RunConfig, method: Method, base_lm: LoadedModel, samples: Sequence[Sample],
    run_dir: Path, resources: Resources, backbone: Backbone,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    task = resources.task
    t0 = t_method = time.time()
    backbone.fit(base_lm, samples, resources, method.steering)
    lm = backbone.model(base_lm)  # what generation and extraction run on
    t_fit = time.time() - t0
    g = method.generation  # the run's, or the method's own (decoding per method)
    params = backbone.decoding(resolve_decoding(
        g.do_sample, g.temperature, g.top_p, base_lm.model,
        max_new_tokens=g.max_new_tokens or cfg.dataset.max_new_tokens, seed=cfg.seed))
    t0 = time.time()
    prompts = backbone.build_prompts(samples)
    texts, n_truncated = fit_prompts(lm, samples, prompts, params.max_new_tokens, g.overlength,
                                     method.name)
    t_prompts = time.time() - t0

    t_steer = time.time()
    inputs = resources.steering_inputs(method.steering)
    if method.steering.extract_with_adapter:
        inputs = dataclasses.replace(
            inputs, user_context=lambda users: backbone.user_context(lm, users),
            user_identity=backbone.user_identity)
    plan = STEERING.get(method.steering.name)(method.steering, lm, samples, inputs)
    t_steer = time.time() - t_steer
    n_cand = backbone.n_candidates
    store_key = content_hash([lm.fingerprint, asdict(params), g.batch_size, g.sort_by_length,
                              g.cache_implementation])
    store = GenerationStore(Path(cfg.cache_dir) / "generations" / f"{store_key}.jsonl")
    digests = plan.row_digests() if plan else [""] * len(texts)
    candidates_of = (lambda: [None]) if n_cand == 1 else (lambda: list(range(n_cand)))
    keys = [[_row_key(store_key, t, d, backbone.row_identity(i), c) for c in candidates_of()]
            for i, (t, d) in enumerate(zip(texts, digests))]
    # What a row's cached output is valid for: the generation store's own key and the row's.
    row_keys = [hashlib.sha256((store_key + "".join(k)).encode()).hexdigest()[:32] for k in keys]
    done: dict[int, list[str]] = {i: [store.items[k] for k in ks] for i, ks in enumerate(keys)
                                  if all(k in store.items for k in ks)}
    out_dir = make_dir(run_dir / method.name, f"the run's folder of method {method.name!r}")
    pred_path = out_dir / "predictions.jsonl"
    # Rerunning into the same run dir: rows written there by a run whose every setting that
    # decides the output was the same (a changed config never reuses a row).
    position = {s.id: i for i, s in enumerate(samples)}
    for row in read_jsonl_lenient(pred_path):
        i = position.get(row.get("id"))
        if i is not None and row.get("cache_key") == row_keys[i] and "candidates" in row:
            done.setdefault(i, list(row["candidates"]))
    if done:
        log.info("[%s] %d/%d rows reused (run dir or cache)", method.name, len(done), len(texts))

    t1 = time.time()
    n_cached = len(done)
    context = _combined_context([
        lambda rows: backbone.model_context(lm, rows),
        plan.batch_context(lm.model) if plan else None,
    ])
    for idx, gens in generate_batches(
        lm, texts, params, batch_size=g.batch_size, sort_by_length=g.sort_by_length,
        skip=set(done), batch_context=context, progress=cfg.progress, desc=method.name,
        num_return_sequences=n_cand, cache_implementation=g.cache_implementation,
    ):
        per_row = [gens[j * n_cand:(j + 1) * n_cand] for j in range(len(idx))]
        store.add([(k, c) for i, cands in zip(idx, per_row) for k, c in zip(keys[i], cands)])
        append_jsonl(pred_path, [{"id": samples[i].id, "user": samples[i].user, "prompt": texts[i],
                                  "cache_key": row_keys[i], "candidates": cands,
                                  "target": samples[i].target}
                                 for i, cands in zip(idx, per_row)], f"{method.name}'s predictions")
        done.update(zip(idx, per_row))
    t_gen = time.time() - t1
    n_generated = len(done) - n_cached

    candidates = [done[i] for i in range(len(texts))]
    chosen, select_info = backbone.select(samples, candidates)
    raw = [c[j] for c, j in zip(candidates, chosen)]
    n_cut = sum(len(r) > cfg.eval.max_read_chars for r in raw)
    if n_cut:
        log.warning("[%s] %d generation(s) are longer than eval.max_read_chars=%d characters: "
                    "only their start is parsed and scored", method.name, n_cut,
                    cfg.eval.max_read_chars)
    t_score = time.time()
    preds = [task.parse(r) for r in raw]
    if any(s.target is None for s in samples):
        log.warning("[%s] the data has no gold outputs: predictions only, no metrics", method.name)
    scores = task.score(preds, samples, cfg.seed)
    t_score = time.time() - t_score
    rows = []
    for i, (s, t, r, p, pr, sc) in enumerate(zip(samples, texts, raw, preds, prompts,
                                                  scores.per_sample)):
        row = {"id": s.id, "user": s.user, "type": s.type, "prompt": t, "generation": r,
               "prediction": p, "target": s.target, "history_ids": pr.history_ids, "scores": sc,
               "cache_key": row_keys[i], "candidates": candidates[i]}
        if n_cand > 1 or select_info[i]:
            row["selection"] = {"chosen": chosen[i], **select_info[i]}
        if plan:
            row["steering"] = {"steered": plan.steered[i], **(plan.row_info[i] if plan.row_info else {})}
        rows.append(row)
    write_jsonl_atomic(pred_path, rows, f"{method.name}'s predictions")  # in sample order, scored
    metrics = {
        **scores.aggregate,
        "n_generated": n_generated,
        "n_cached": n_cached,
        "n_prompts_truncated": n_truncated,
        "n_generations_cut": n_cut,
        # what generated the rows, nulls resolved from the checkpoint (not a score column)
        "decoding": {k: getattr(params, k) for k in ("do_sample", "temperature", "top_p",
                                                     "max_new_tokens")},
        "seconds_fit": round(t_fit, 3),
        "seconds_prompts": round(t_prompts, 3),
        "seconds_steering_prep": round(t_steer, 3),
        "seconds_generation": round(t_gen, 3),
        # parsing and scoring (function calling: executing every call), and its share of
        # this method's time
        "seconds_scoring": round(t_score, 3),
        "scoring_share": round(t_score / max(time.time() - t_method, 1e-9), 4),
        "samples_per_second": round(n_generated / t_gen, 3) if n_generated and t_gen > 0 else None,
        **backbone.metrics(),
    }
    if plan:
        metrics.update({f"steering_{k}": v for k, v in plan.stats.items()})
        if plan.stats.get("n_samples_unsteered"):
            log.warning("[%s] %d of %d samples have no pairs and were generated unsteered",
                        method.name, plan.stats["n_samples_unsteered"], len(samples))
    write_json_atomic(out_dir / "metrics.json", metrics, f"{method.name}'s metrics")
    return metrics, rows


def metric_keys(results: dict[str, dict[str, Any]]) -> list[str]:
    """The score columns of a results table, in the order the task reports them (``n``, its
    metrics, the entries that extend them such as bootstrap medians, then per-type means);
    timings, counts and steering statistics are left out."""
    skip = {"n_generated", "n_cached", "n_prompts_truncated", "n_generations_cut",
            "samples_per_second", "scoring_share"}
    keys: list[str] = []
    for m in results.values():
        keys += [k for k, v in m.items() if k not in keys and k not in skip
                 and not k.startswith(("seconds_", "steering_", "backbone_")) and isinstance(v, (int, float))]
    return keys


def run_experiment(cfg: RunConfig, run_dir: Path, overrides: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """Run every method of ``cfg``. ``overrides``: what ``cfg`` was composed from (needed to
    compose a preset's methods through Hydra; see fints_repro/compose.py). With
    ``cfg.threads`` set, torch uses that many CPU threads for the run, and the caller's
    setting is back afterwards."""
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_experiment(cfg, run_dir, overrides)
    finally:
        torch.set_num_threads(before)


def _run_experiment(cfg: RunConfig, run_dir: Path, overrides: Sequence[str] | None) -> dict[str, Any]:
    # Start-up checks, before any data or model is loaded: every method is composed and
    # every name and value checked (RunConfig's own values were checked when it was made).
    methods = resolve_methods(cfg, overrides)
    check_names(cfg, methods)
    shape = shape_from_config(cfg.model, cfg.cache_dir)
    if shape.n_layers is not None:
        for m in methods:
            if m.steering.name != "none":
                check_layer(m.steering.layer, shape.n_layers)
    task = build_task(cfg.dataset, cfg.generation, cfg.eval, cfg.seed)
    task.check_inputs()

    make_dir(run_dir, "run_dir")
    seed_everything(cfg.seed)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(resolved), "the run's config")

    reader = SplitReader()
    samples = load_samples(cfg.dataset, seed=cfg.seed, reader=reader)
    if not samples:
        raise DataError(f"dataset {cfg.dataset.name}: no samples left after user/history selection")
    n_users = len({s.user for s in samples})
    n_empty = sum(1 for s in samples if not s.history)
    log.info("%d samples of %d users (%d with an empty history)", len(samples), n_users, n_empty)
    resources = Resources(cfg, None, task, overrides or (), reader)  # the model: below
    check_pair_sources(cfg, methods, samples, resources)

    t0 = time.time()
    lm = with_task_system_prompt(load_model(cfg.model, cfg.cache_dir), cfg.dataset.system_prompt)
    log.info("model %s loaded in %.1fs on %s", lm.fingerprint, time.time() - t0, lm.device)
    resources.lm = lm
    results: dict[str, dict[str, Any]] = {}
    with open_tracker(cfg.logger, run_dir=run_dir, config=resolved,
                      name=f"{cfg.dataset.name}-{cfg.model.name}") as tracker:
        for method in methods:
            metrics, rows = run_method(cfg, method, lm, samples, run_dir, resources)
            results[method.name] = metrics
            tracker.log_metrics({f"{method.name}/{k}": v for k, v in metrics.items()})
            for k, v in metrics.items():  # per-step curves (BiPO's loss) as line plots
                if k.endswith("_curve") and isinstance(v, list):
                    tracker.log_curve(f"{method.name}/{k}", v)
            tracker.log_table(f"{method.name}/samples", [
                {k: r[k] for k in ("id", "user", "prompt", "prediction", "target")}
                | {f"score/{k}": v for k, v in r["scores"].items()}
                for r in rows[: cfg.logger.n_table_rows]
            ])
            log.info("[%s] %s", method.name, json.dumps(
                {k: v for k, v in metrics.items() if k in metric_keys(results)}))

    synthetic = cfg.dataset.loader == "demo"
    summary = {
        "dataset": cfg.dataset.name, "synthetic_data": synthetic, "task": task.describe(),
        "model": lm.fingerprint, "n_samples": len(samples),
        "n_users": n_users, "n_empty_history": n_empty, "threads": torch.get_num_threads(),
        "methods": results,
    }
    write_json_atomic(run_dir / "metrics.json", summary, "the run's metrics")
    for marker in (FAILED, INTERRUPTED):  # left by an earlier try of this run, now done
        (run_dir / marker).unlink(missing_ok=True)
    table = markdown([{"method": name, **m} for name, m in results.items()],
                     ["method", *metric_keys(results)]).rstrip()
    write_text_atomic(run_dir / "summary.md", table + "\n", "the run's results table")
    label = f"{cfg.dataset.name} (SYNTHETIC demo data)" if synthetic else cfg.dataset.name
    print(f"\n{label} · {cfg.model.name} · {len(samples)} samples, {n_users} users\n"
          f"{table}\n\nrun dir: {run_dir}")
    return summary
