"""One experiment in parts: ``shard.count=N shard.index=i`` (docs/scale.md).

- **Split** (``shard_samples``): the evaluated users, selected as in the whole experiment
  (``dataset.n_users``, ``dataset.users``, ...), sorted by id and dealt round-robin into
  ``count`` parts; a job keeps the samples of part ``index``, in the whole run's order.
  Stages over every user (BiPO with ``scope=all``) still see them all (``all_samples``).
- **Merge** (``merge``; ``python -m fints_repro.report merge SWEEP_DIR``, and by the
  report callback when a multirun of shards ends): the jobs of one experiment (equal
  configs but for ``shard.index``) are joined into ``SWEEP_DIR/merged/`` (several
  experiments in one sweep: ``merged/<their differences>/``): each method's rows in the
  whole run's sample order (``<method>/predictions.jsonl``), and its scores recomputed over
  all of them by the task (``metrics.json``: every aggregate and the bootstrap, equal to
  the unsharded run's), with the shards' counts and seconds summed and everything else a
  shard reported kept per shard. A missing part, a part without metrics, or a sample in
  two parts or in none is an error naming the jobs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence, TypeVar

from fints_repro.cache import content_hash, read_jsonl_lenient, write_json_atomic, write_jsonl_atomic
from fints_repro.config import DatasetConfig, EvalConfig, GenerationConfig, ShardConfig
from fints_repro.data.load import load_samples
from fints_repro.errors import ConfigError, DataError
from fints_repro.tasks import build_task

log = logging.getLogger(__name__)

T = TypeVar("T")

MERGED = "merged"
# Per-method metrics that are sums over a run's rows (counts and seconds): summed over
# shards. Everything else besides the task's aggregate is kept per shard.
SUMMED_PREFIXES = ("n_", "seconds_")


def shard_users(users: Sequence[str], shard: ShardConfig) -> list[str]:
    """The users of part ``shard.index`` of ``shard.count``: sorted by id, dealt round-robin."""
    return sorted(set(users))[shard.index::shard.count]


def shard_samples(samples: Sequence[T], shard: ShardConfig) -> list[T]:
    """The samples of this job's users, in their order in ``samples``."""
    if shard.count == 1:
        return list(samples)
    mine = set(shard_users([s.user for s in samples], shard))  # type: ignore[attr-defined]
    return [s for s in samples if s.user in mine]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ merge


def _config(job: Path) -> dict[str, Any]:
    path = job / "config.yaml"
    if not path.is_file():
        raise DataError(f"{job}: no config.yaml (not a run folder of fints_repro.run)", file=path)
    import yaml

    return yaml.safe_load(path.read_text())


def _experiment(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the parts of one experiment share: the config without ``shard.index`` and the
    run folder."""
    rest = {k: v for k, v in cfg.items() if k != "run_dir"}
    rest["shard"] = {"count": cfg.get("shard", {}).get("count", 1)}
    return rest


Job = tuple[Path, dict[str, Any]]  # a part's run folder and its config.yaml


def sharded_jobs(root: Path) -> dict[str, list[Job]]:
    """The sharded jobs under a sweep folder, by experiment (``_experiment``, as JSON)."""
    groups: dict[str, list[Job]] = {}
    for job in sorted(p for p in root.iterdir() if (p / "config.yaml").is_file()):
        cfg = _config(job)
        if cfg.get("shard", {}).get("count", 1) > 1:
            key = json.dumps(_experiment(cfg), sort_keys=True, default=str)
            groups.setdefault(key, []).append((job, cfg))
    return groups


def _typed(cls: type[T], node: dict[str, Any]) -> T:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))  # type: ignore[return-value]


def _differences(configs: list[dict[str, Any]]) -> list[str]:
    """Per experiment (``_experiment``), ``key=value`` of the top-level settings where
    they differ."""
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str)
                                        for c in configs}) > 1]
    out = []
    for c in configs:
        parts = []
        for k in varying:
            v = c.get(k)
            parts.append(f"{k}={v}" if not isinstance(v, (dict, list)) else
                         f"{k}-{content_hash(v)[:8]}")
        out.append(",".join(parts))
    return out


def merge(root: Path) -> list[Path]:
    """Merge every sharded experiment under ``root`` (see the module doc); returns the
    merged folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder", file=root)
    groups = sharded_jobs(root)
    if not groups:
        raise DataError(f"{root}: no job folder of a sharded run (shard.count > 1)", file=root)
    configs = [_experiment(jobs[0][1]) for jobs in groups.values()]
    names = _differences(configs) if len(groups) > 1 else [""]
    out = []
    for jobs, name in zip(groups.values(), names):
        target = root / MERGED / name if name else root / MERGED
        out.append(merge_experiment(jobs, target))
    return out


def merge_experiment(jobs: Sequence[Job], out: Path) -> Path:
    """The parts of one experiment (``jobs``: their run folders and configs) merged into
    ``out``."""
    by_index: dict[int, Path] = {}
    cfg: dict[str, Any] = {}
    for job, cfg in jobs:
        i = cfg["shard"]["index"]
        if i in by_index:
            raise DataError(f"part {i} of the experiment ran twice: {by_index[i]} and {job}", file=job)
        by_index[i] = job
    count = cfg["shard"]["count"]
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise DataError(f"{out.parent}: parts {missing} of {count} have no run folder "
                        f"(found: {', '.join(str(j) for j, _ in jobs)}); run them and merge again",
                        file=out.parent)
    summaries = {}
    for i, job in sorted(by_index.items()):
        path = job / "metrics.json"
        if not path.is_file():
            raise DataError(f"part {i} ({job}) has no metrics.json: it failed or was stopped; "
                            f"re-run it (the same command resumes) and merge again", file=job)
        summaries[i] = json.loads(path.read_text())

    dataset = _typed(DatasetConfig, cfg["dataset"])
    task = build_task(dataset, _typed(GenerationConfig, cfg["generation"]),
                      _typed(EvalConfig, cfg["eval"]), cfg["seed"])
    samples = load_samples(dataset, seed=cfg["seed"])
    order = {s.id: n for n, s in enumerate(samples)}
    methods = list(summaries[0]["methods"])
    merged_methods: dict[str, dict[str, Any]] = {}
    for method in methods:
        rows: dict[str, dict[str, Any]] = {}
        for i, job in sorted(by_index.items()):
            if method not in summaries[i]["methods"]:
                raise DataError(f"part {i} ({job}) has no method {method!r}", file=job)
            path = job / method / "predictions.jsonl"
            for row in read_jsonl_lenient(path):
                if row["id"] in rows:
                    raise DataError(f"sample {row['id']!r} of method {method!r} is in two parts "
                                    f"(the second: {job})", file=path)
                if row["id"] not in order:
                    raise DataError(f"sample {row['id']!r} of {path} is not among the "
                                    f"experiment's samples", file=path)
                rows[row["id"]] = row
        absent = [s.id for s in samples if s.id not in rows]
        if absent:
            raise DataError(f"method {method!r}: {len(absent)} sample(s) are in no part "
                            f"(first: {absent[:5]})", file=out)
        ordered = [rows[s.id] for s in samples]
        preds = [task.parse(r["generation"]) for r in ordered]
        # a task's model-time values (the style metric's NLL) are kept in each row's scores
        values = {name: [r["scores"].get(name) for r in ordered] for name in task.model_values}
        scores = task.score(preds, samples, cfg["seed"], values or None)
        for r, own in zip(ordered, scores.per_sample):
            if json.dumps(r["scores"], sort_keys=True) != json.dumps(own, sort_keys=True):
                # a row's scores are its own: the same in any run of its experiment
                raise DataError(f"sample {r['id']!r} of method {method!r}: scores {r['scores']} "
                                f"in its part, {own} recomputed", file=out)
        parts = [summaries[i]["methods"][method] for i in sorted(summaries)]
        merged_methods[method] = merged_method_metrics(scores.aggregate, parts)
        write_jsonl_atomic(out / method / "predictions.jsonl", ordered, f"{method}'s merged predictions")
        write_json_atomic(out / method / "metrics.json", merged_methods[method],
                          f"{method}'s merged metrics")
    first = summaries[0]
    summary = {
        "dataset": first["dataset"], "synthetic_data": first.get("synthetic_data"),
        "task": first.get("task"), "model": first["model"], "n_samples": len(samples),
        "n_users": len({s.user for s in samples}),
        "n_empty_history": sum(1 for s in samples if not s.history),
        "engine": first.get("engine"),
        "shards": {"count": count, "jobs": [str(by_index[i]) for i in sorted(by_index)],
                   "provenance": [summaries[i].get("provenance") for i in sorted(summaries)]},
        "methods": merged_methods,
    }
    write_json_atomic(out / "metrics.json", summary, "the merged metrics")
    log.info("merged %d parts into %s", count, out)
    return out


def merged_method_metrics(aggregate: dict[str, Any], parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The task's ``aggregate`` over all rows, the parts' counts and seconds summed
    (``SUMMED_PREFIXES``), the decoding they share, and each part's other entries under
    ``shards``."""
    out: dict[str, Any] = dict(aggregate)
    for key in parts[0]:
        values = [p.get(key) for p in parts]
        if key in aggregate:
            continue
        if key.startswith(SUMMED_PREFIXES) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            total = sum(values)
            out[key] = round(total, 3) if isinstance(total, float) else total
    decodings = {json.dumps(p.get("decoding"), sort_keys=True) for p in parts}
    if len(decodings) != 1:
        raise ConfigError(f"the parts decoded differently: {sorted(decodings)}")
    out["decoding"] = parts[0].get("decoding")
    out["shards"] = [{k: v for k, v in p.items() if k not in out} for p in parts]
    return out
