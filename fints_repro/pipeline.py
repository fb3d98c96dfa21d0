"""The run: start-up checks → data → model → each method through the stages of
``stages.py`` → the run's metrics and table.

Generations are cached on disk by content hash (model fingerprint, decoding settings,
prompt, the backbone's row identity, the candidate index and the row's steering vectors),
appended batch by batch, so a killed run resumes where it stopped and an identical rerun
costs no model time.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from fints_repro import stages
from fints_repro.backbones import BACKBONES, build_backbone
from fints_repro.cache import make_dir, write_json_atomic, write_text_atomic, writing_as
from fints_repro.checks import check_layer
from fints_repro.compose import Method, check_names, resolve_methods
from fints_repro.config import RunConfig
from fints_repro.data.load import SplitReader, load_samples
from fints_repro.errors import ConfigError, DataError
from fints_repro.models.inspect import shape_from_config
from fints_repro.models.engines import with_engine
from fints_repro.models.loading import load_model
from fints_repro.provenance import machine, provenance
from fints_repro.report import FAILED, INTERRUPTED, markdown, metric_keys
from fints_repro.shards import shard_samples
from fints_repro.stages import RunContext, with_task_system_prompt
from fints_repro.tasks import build_task
from fints_repro.tracking import open_tracker

log = logging.getLogger(__name__)

__all__ = ["Method", "run_experiment", "run_method"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_pair_sources(cfg: RunConfig, methods: Sequence[Method], ctx: RunContext) -> None:
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
    items = ctx.train_items()
    users = sorted({s.user for s in ctx.samples})
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


def run_method(ctx: RunContext, method: Method, run_dir: Path
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One method, stage by stage (``stages``): fit → prompts → steering plan → N
    candidates per row (cached, resumable) → selection → parsing and scores → written."""
    base_lm = ctx.model(None)
    backbone = build_backbone(method.backbone, ctx.task, ctx.retriever)
    timings = stages.Timings()
    try:
        with timings.measure("fit"):
            lm = stages.fit(ctx, method, backbone, base_lm)
        params = stages.decoding(ctx, method, backbone, base_lm)
        with timings.measure("prompts"):
            prompts = stages.build_prompts(ctx, method, backbone, lm, params)
        with timings.measure("steering_prep"):
            plan = stages.steering_plan(ctx, method, backbone, lm)
        out_dir = stages.method_dir(run_dir, method)
        with timings.measure("generation"):
            generated = stages.generate(ctx, method, backbone, lm, prompts, plan, out_dir)
        selected = stages.select(ctx, method, backbone, generated)
        with timings.measure("scoring"):
            scored = stages.parse_and_score(ctx, method, selected)
        rows = stages.prediction_rows(ctx, backbone, prompts, plan, generated, selected, scored)
        metrics = stages.method_metrics(backbone, prompts, plan, generated, selected, scored, timings)
    finally:
        backbone.close(base_lm)
    if plan and plan.stats.get("n_samples_unsteered"):
        log.warning("[%s] %d of %d samples have no pairs and were generated unsteered",
                    method.name, plan.stats["n_samples_unsteered"], len(ctx.samples))
    stages.write(out_dir, method, rows, metrics)
    return metrics, rows


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
    started = provenance()  # the code and the date the run started with
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
    all_samples = load_samples(cfg.dataset, seed=cfg.seed, reader=reader)
    if not all_samples:
        raise DataError(f"dataset {cfg.dataset.name}: no samples left after user/history selection")
    samples = shard_samples(all_samples, cfg.shard)
    n_users = len({s.user for s in samples})
    if not samples:
        raise ConfigError(f"shard.count={cfg.shard.count}: more parts than the experiment's "
                          f"{len({s.user for s in all_samples})} users (part {cfg.shard.index} "
                          "has none)")
    n_empty = sum(1 for s in samples if not s.history)
    log.info("%d samples of %d users (%d with an empty history)%s", len(samples), n_users, n_empty,
             f"; part {cfg.shard.index} of {cfg.shard.count} of the experiment's "
             f"{len(all_samples)} samples" if cfg.shard.count > 1 else "")
    ctx = RunContext(cfg, task, samples, list(overrides or ()), reader,  # the model: below
                     all_samples=all_samples if cfg.shard.count > 1 else [])
    check_pair_sources(cfg, methods, ctx)

    t0 = time.time()
    # the largest rank of the per-user adapters the methods bring (an engine that loads
    # them itself reserves its slots when its model is loaded)
    adapter_rank = max((BACKBONES.get(m.backbone.name, "backbone.name").adapter_rank(m.backbone)
                        for m in methods), default=0)
    lm = with_task_system_prompt(
        with_engine(load_model(cfg.model, cfg.cache_dir), cfg.engine, adapter_rank),
        cfg.dataset.system_prompt)
    log.info("model %s loaded in %.1fs on %s", lm.fingerprint, time.time() - t0, lm.device)
    ctx.lm = lm
    tag = f"part-{cfg.shard.index}-of-{cfg.shard.count}" if cfg.shard.count > 1 else ""
    try:
        with writing_as(tag):  # each part appends to cache files of its own
            results = _run_methods(cfg, ctx, methods, run_dir, resolved)
    finally:
        ctx.close()  # the engines' models (vLLM's KV cache) before the next job of a sweep
    return _summarise(cfg, task, ctx, results, run_dir, started, n_users, n_empty)


def _run_methods(cfg: RunConfig, ctx: RunContext, methods: Sequence[Method], run_dir: Path,
                 resolved: Any) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with open_tracker(cfg.logger, run_dir=run_dir, config=resolved,
                      name=f"{cfg.dataset.name}-{cfg.model.name}") as tracker:
        for method in methods:
            metrics, rows = run_method(ctx, method, run_dir)
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
    return results


def _summarise(cfg: RunConfig, task: Any, ctx: RunContext, results: dict[str, dict[str, Any]],
               run_dir: Path, started: dict[str, Any], n_users: int, n_empty: int
               ) -> dict[str, Any]:
    lm, samples = ctx.model(None), ctx.samples
    synthetic = cfg.dataset.loader == "demo"
    summary = {
        "dataset": cfg.dataset.name, "synthetic_data": synthetic, "task": task.describe(),
        "model": lm.fingerprint, "n_samples": len(samples),
        "n_users": n_users, "n_empty_history": n_empty, "threads": torch.get_num_threads(),
        "engine": cfg.engine.name,
        "provenance": {**started, "machine": machine(str(lm.device))}, "methods": results,
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
