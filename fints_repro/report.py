"""Multirun results → tables.

    python -m fints_repro.report <multirun dir>

Reads every job's ``metrics.json`` and ``.hydra/overrides.yaml`` under the directory and
writes, next to them:

- ``summary.csv`` / ``summary.md``: one row per (job, method) with the job's overrides,
  the metrics and counts; a job without ``metrics.json`` (failed or killed) is a row with
  status ``failed``;
- ``seeds.md`` (when ``seed`` was swept): per (other overrides, method), the mean and the
  sample standard deviation over seeds of each score.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

SCORES = ("rouge1", "rougeL", "meteor")


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(o.lstrip("+").split("=", 1) for o in items if "=" in o)


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per (job, method); failed jobs give one row with status 'failed'."""
    rows: list[dict[str, Any]] = []
    jobs = sorted((p for p in root.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (len(p.name), p.name))
    for job in jobs:
        over = _overrides(job)
        metrics_path = job / "metrics.json"
        if not metrics_path.exists():
            rows.append({"job": job.name, "status": "failed", **over})
            continue
        summary = json.loads(metrics_path.read_text())
        for method, m in summary["methods"].items():
            rows.append({"job": job.name, "status": "ok", **over, "method": method,
                         **{k: v for k, v in m.items() if isinstance(v, (int, float, str))}})
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def seed_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        key = tuple(sorted((k, str(v)) for k, v in r.items() if k in r.get("_over", ())))
        groups.setdefault(key + (("method", r["method"]),), []).append(r)
    out = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(key)
        row["seeds"] = len(members)
        for s in SCORES:
            vals = [m[s] for m in members if isinstance(m.get(s), (int, float))]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
                row[s] = f"{statistics.mean(vals):.4f} ± {sd:.4f}"
        out.append(row)
    return out


def write_report(root: Path) -> dict[str, Path]:
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no Hydra job folders under {root}")
    per_job = [_overrides(j) for j in root.iterdir() if (j / ".hydra").is_dir()]
    all_keys = sorted({k for o in per_job for k in o})
    # Only what the sweep varied becomes a column; the rest is stated once above the table.
    over_keys = [k for k in all_keys if len({o.get(k) for o in per_job}) > 1]
    fixed = {k: per_job[0].get(k) for k in all_keys if k not in over_keys}
    header = "Fixed overrides: " + (" ".join(f"`{k}={v}`" for k, v in fixed.items()) or "none")
    metric_keys = [k for k in ("n", "rouge1", "rougeL", "rouge1_bootstrap", "rougeL_bootstrap",
                               "meteor", "steering_n_pairs", "steering_n_samples_unsteered",
                               "seconds_generation") if any(k in r for r in rows)]
    columns = ["job", "status", *over_keys, "method", *metric_keys]
    out = {"csv": root / "summary.csv", "md": root / "summary.md"}
    with open(out["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    out["md"].write_text(header + "\n\n" + markdown(rows, columns))
    if "seed" in over_keys:
        others = [k for k in over_keys if k != "seed"]
        for r in rows:
            r["_over"] = others
        table = seed_table(rows)
        out["seeds"] = root / "seeds.md"
        cols = [*others, "method", "seeds", *[s for s in SCORES if any(s in t for t in table)]]
        out["seeds"].write_text(header + "\n\nMean ± sample standard deviation over seeds.\n\n"
                                + markdown(table, cols))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="multirun results -> summary tables")
    ap.add_argument("multirun_dir", type=Path)
    args = ap.parse_args(argv)
    for name, path in write_report(args.multirun_dir).items():
        print(f"{name}: {path}")
    print((args.multirun_dir / "summary.md").read_text())
    if (args.multirun_dir / "seeds.md").exists():
        print((args.multirun_dir / "seeds.md").read_text())


if __name__ == "__main__":
    main()
