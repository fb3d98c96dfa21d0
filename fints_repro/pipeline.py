"""The run, stage by stage: data → model → (per method) prompts → generations → metrics.

Every stage is a plain function of plain data. Generations are cached on disk by content
hash (model fingerprint, decoding settings, steering, prompt), appended batch by batch, so
a killed run resumes where it stopped and an identical rerun costs no model time.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from fints_repro.backbones import build_backbone
from fints_repro.cache import (
    GenerationStore,
    append_jsonl,
    content_hash,
    read_jsonl_lenient,
    write_jsonl_atomic,
)
from fints_repro.config import BackboneConfig, ModelConfig, RunConfig, SteeringConfig
from fints_repro.data.load import load_samples
from fints_repro.data.schema import Sample
from fints_repro.errors import ConfigError, DataError
from fints_repro.eval import compute_metrics
from fints_repro.eval.postprocess import postprocess
from fints_repro.generation import DecodingParams, generate_batches
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.report import markdown
from fints_repro.retrieval import Retriever, build_retriever
from fints_repro.steering import STEERING, SteeringInputs, load_methods
from fints_repro.tracking import open_tracker

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # replaced by Hydra compose below


@dataclass
class Method:
    name: str
    backbone: BackboneConfig
    steering: SteeringConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _group_option(group: str, name: str, schema: type, current: Any) -> Any:
    """The config of option ``name`` of ``group``; the run's own one (with its command-line
    overrides) when it is the option the run was composed with."""
    if current.name == name:
        return current
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"methods: no {group} option {name!r} (known: {known})")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))


def resolve_methods(cfg: RunConfig) -> list[Method]:
    specs = cfg.methods or []
    if not specs:
        return [Method(_method_name(cfg.backbone.name, cfg.steering.name), cfg.backbone, cfg.steering)]
    methods = []
    for spec in specs:
        groups = {
            "backbone": _group_option("backbone", spec.backbone, BackboneConfig, cfg.backbone),
            "steering": _group_option("steering", spec.steering, SteeringConfig, cfg.steering),
        }
        for key, value in spec.overrides.items():
            group, _, rest = key.partition(".")
            if group not in groups or not rest:
                raise ConfigError(f"methods: override {key!r} must start with backbone. or steering.")
            node = OmegaConf.structured(groups[group])
            OmegaConf.update(node, rest, value, merge=False)  # struct: a misspelt key fails here
            groups[group] = OmegaConf.to_object(node)
        bb, st = groups["backbone"], groups["steering"]
        methods.append(Method(spec.name or _method_name(bb.name, st.name), bb, st))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: duplicate method names {names}")
    return methods


def _method_name(backbone: str, steering: str) -> str:
    return backbone if steering == "none" else f"{backbone}+{steering}"


class Resources:
    """Built on first use and shared by every method of a run: the retriever, and models
    other than the run's own (e.g. a separate pair generator)."""

    def __init__(self, cfg: RunConfig, lm: LoadedModel):
        self.cfg, self.lm = cfg, lm
        self._retriever: Retriever | None = None
        self._models: dict[str, LoadedModel] = {}

    def retriever(self) -> Retriever:
        if self._retriever is None:
            self._retriever = build_retriever(self.cfg.retriever)
        return self._retriever

    def model(self, name: str | None) -> LoadedModel:
        if name is None or name == self.cfg.model.name:
            return self.lm
        if name not in self._models:
            mcfg = _group_option("model", name, ModelConfig, self.cfg.model)
            self._models[name] = load_model(mcfg, self.cfg.cache_dir)
        return self._models[name]

    def steering_inputs(self, steering: SteeringConfig) -> SteeringInputs:
        return SteeringInputs(
            dataset=self.cfg.dataset, cache_dir=self.cfg.cache_dir, seed=self.cfg.seed,
            retriever=self.retriever, generator=lambda: self.model(steering.pairs.generator),
            layers_path=self.cfg.model.layers_path, progress=self.cfg.progress,
        )


def run_method(
    cfg: RunConfig, method: Method, lm: LoadedModel, samples: Sequence[Sample],
    run_dir: Path, resources: Resources,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prompts → (steering plan) → generations (cached, resumable) → metrics, for one method."""
    t0 = time.time()
    backbone = build_backbone(method.backbone, cfg.dataset, resources.retriever)
    prompts = backbone.build_prompts(samples)
    texts = [render_chat(lm.tokenizer, p.text, lm.system_prompt) for p in prompts]
    t_prompts = time.time() - t0

    g = cfg.generation
    params = DecodingParams(
        max_new_tokens=g.max_new_tokens or cfg.dataset.max_new_tokens,
        do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p, seed=cfg.seed,
    )
    t_steer = time.time()
    plan = STEERING.get(method.steering.name)(method.steering, lm, samples,
                                               resources.steering_inputs(method.steering))
    t_steer = time.time() - t_steer
    batch_context = plan.batch_context(lm.model) if plan else None
    # A row's cache key is its full input: the prompt and, when steered, its vectors.
    store_key = content_hash([lm.fingerprint, asdict(params), g.batch_size, g.sort_by_length])
    store = GenerationStore(Path(cfg.cache_dir) / "generations" / f"{store_key}.jsonl")
    digests = plan.row_digests() if plan else [""] * len(texts)
    keys = [store.key(t + "\0" + d if d else t) for t, d in zip(texts, digests)]
    done: dict[int, str] = {i: store.items[k] for i, k in enumerate(keys) if k in store.items}
    out_dir = run_dir / method.name
    out_dir.mkdir(parents=True, exist_ok=True)
    pred_path = out_dir / "predictions.jsonl"
    # Rerunning into the same run dir: rows already written there (same id, same prompt).
    position = {s.id: i for i, s in enumerate(samples)}
    for row in read_jsonl_lenient(pred_path):
        i = position.get(row.get("id"))
        if i is not None and row.get("prompt") == texts[i] and "generation" in row:
            done.setdefault(i, row["generation"])
    if done:
        log.info("[%s] %d/%d generations reused (run dir or cache)", method.name, len(done), len(texts))

    t1 = time.time()
    n_cached = len(done)
    for idx, gens in generate_batches(
        lm, texts, params, batch_size=g.batch_size, sort_by_length=g.sort_by_length,
        skip=set(done), batch_context=batch_context, progress=cfg.progress, desc=method.name,
    ):
        store.add([(keys[i], gen) for i, gen in zip(idx, gens)])
        append_jsonl(pred_path, [{"id": samples[i].id, "user": samples[i].user, "prompt": texts[i],
                                   "generation": gen, "target": samples[i].target}
                                  for i, gen in zip(idx, gens)])
        done.update(zip(idx, gens))
    t_gen = time.time() - t1
    n_generated = len(done) - n_cached

    raw = [done[i] for i in range(len(texts))]
    preds = postprocess(raw, g.postprocess)
    targets = [s.target for s in samples]
    if any(t is None for t in targets):
        log.warning("[%s] the data has no gold outputs: predictions only, no metrics", method.name)
        agg, per_sample = {"n": len(samples)}, [{} for _ in samples]
    else:
        agg, per_sample = compute_metrics(list(cfg.dataset.metrics), preds, targets,
                                          bootstrap=cfg.eval.bootstrap, seed=cfg.seed)
    rows = [
        {"id": s.id, "user": s.user, "prompt": t, "generation": r, "prediction": p,
         "target": s.target, "history_ids": pr.history_ids, "scores": sc}
        for s, t, r, p, pr, sc in zip(samples, texts, raw, preds, prompts, per_sample)
    ]
    if plan:
        for i, row in enumerate(rows):
            row["steering"] = {"steered": plan.steered[i], **(plan.row_info[i] if plan.row_info else {})}
    write_jsonl_atomic(pred_path, rows)  # now in sample order, with scores
    metrics = {
        **agg,
        "n_generated": n_generated,
        "n_cached": n_cached,
        "seconds_prompts": round(t_prompts, 3),
        "seconds_steering_prep": round(t_steer, 3),
        "seconds_generation": round(t_gen, 3),
        "samples_per_second": round(n_generated / t_gen, 3) if n_generated and t_gen > 0 else None,
    }
    if plan:
        metrics.update({f"steering_{k}": v for k, v in plan.stats.items()})
        if plan.stats.get("n_samples_unsteered"):
            log.warning("[%s] %d of %d samples have no pairs and were generated unsteered",
                        method.name, plan.stats["n_samples_unsteered"], len(samples))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, rows


def metric_keys(results: dict[str, dict[str, Any]]) -> list[str]:
    skip = {"n_generated", "n_cached", "samples_per_second"}
    keys: list[str] = []
    for m in results.values():
        keys += [k for k, v in m.items() if k not in keys and k not in skip
                 and not k.startswith(("seconds_", "steering_")) and isinstance(v, (int, float))]
    return keys


def run_experiment(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    load_methods()
    methods = resolve_methods(cfg)  # fail on a bad method list before loading anything
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

    samples = load_samples(cfg.dataset, seed=cfg.seed)
    if not samples:
        raise DataError(f"dataset {cfg.dataset.name}: no samples left after user/history selection")
    n_users = len({s.user for s in samples})
    n_empty = sum(1 for s in samples if not s.history)
    log.info("%d samples of %d users (%d with an empty history)", len(samples), n_users, n_empty)

    t0 = time.time()
    lm = load_model(cfg.model, cfg.cache_dir)
    log.info("model %s loaded in %.1fs on %s", lm.fingerprint, time.time() - t0, lm.device)

    resources = Resources(cfg, lm)
    results: dict[str, dict[str, Any]] = {}
    with open_tracker(cfg.logger, run_dir=run_dir, config=resolved,
                      name=f"{cfg.dataset.name}-{cfg.model.name}") as tracker:
        for method in methods:
            metrics, rows = run_method(cfg, method, lm, samples, run_dir, resources)
            results[method.name] = metrics
            tracker.log_metrics({f"{method.name}/{k}": v for k, v in metrics.items()})
            tracker.log_table(f"{method.name}/samples", [
                {k: r[k] for k in ("id", "user", "prompt", "prediction", "target")}
                | {f"score/{k}": v for k, v in r["scores"].items()}
                for r in rows[: cfg.logger.n_table_rows]
            ])
            log.info("[%s] %s", method.name, json.dumps(
                {k: v for k, v in metrics.items() if k in metric_keys(results)}))

    synthetic = cfg.dataset.loader == "demo"
    summary = {
        "dataset": cfg.dataset.name, "synthetic_data": synthetic,
        "model": lm.fingerprint, "n_samples": len(samples),
        "n_users": n_users, "n_empty_history": n_empty, "methods": results,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    table = markdown([{"method": name, **m} for name, m in results.items()],
                     ["method", *metric_keys(results)]).rstrip()
    (run_dir / "summary.md").write_text(table + "\n")
    label = f"{cfg.dataset.name} (SYNTHETIC demo data)" if synthetic else cfg.dataset.name
    print(f"\n{label} · {cfg.model.name} · {len(samples)} samples, {n_users} users\n"
          f"{table}\n\nrun dir: {run_dir}")
    return summary
