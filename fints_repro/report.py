"""Multirun results → tables and plots.

    python -m fints_repro.report <multirun dir>
    python -m fints_repro.report merge <sweep dir>     # a sharded experiment's parts

(also run by a Hydra callback at the end of every multirun, see conf/config.yaml)

Reads every job's ``metrics.json`` and ``.hydra/overrides.yaml`` under the directory and
writes, next to them:

- ``summary.csv`` / ``summary.md``: one row per (job, method) with the job's overrides,
  the metrics and counts; a job without ``metrics.json`` (failed or killed) is a row with
  status ``failed``;
- ``seeds.md`` (when ``seed`` was swept): per (other overrides, method), the mean and the
  sample standard deviation over seeds of each score;
- ``heatmap_<metric>.png`` (when a strength and one other parameter were swept, a layer
  first: layer × strength, or e.g. SteerX's tau × strength): the metric, mean over seeds,
  one panel per steered method, the unsteered baseline in the title;
- ``vs_<param>.png``: the metric against each swept parameter, one line per method, the
  unsteered methods drawn as dashed horizontal baselines;
- ``README.md``: the command, the commit, the date and the machine (as the jobs recorded
  them in ``metrics.json``), the resolved config's key settings and the table (``seeds.md``
  where seeds were swept, else ``summary.md``). The findings in prose live in ``docs/``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from fints_repro.cache import atomic_file, write_text_atomic
from fints_repro.errors import DataError
from fints_repro.shards import merge, sharded_jobs

# What a job leaves in its run dir when it ends without metrics: FAILED (a multirun job's
# exception, its traceback) or INTERRUPTED (SIGTERM / SIGINT; fints_repro/signals.py).
# run.py writes them; a run that completes removes them.
FAILED, INTERRUPTED = "FAILED", "INTERRUPTED"

LAYER_KEYS = ("steering.layer",)
STRENGTH_KEYS = ("steering.scale", "steering.alpha", "steering.beta", "steering.gamma")


def _overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    items = yaml.safe_load(path.read_text()) or []
    return dict(o.lstrip("+").split("=", 1) for o in items if "=" in o)


def task_of(root: Path) -> dict[str, Any]:
    """The task description the jobs' metrics.json carry (``{name, metrics, primary}``):
    which score names to tabulate and which one to plot. A sweep mixing tasks has no one
    primary metric: the first job's is used, and every job's scores are tabulated."""
    metrics: list[str] = []
    primary = None
    for path in sorted(root.glob("*/metrics.json")):
        task = json.loads(path.read_text()).get("task") or {}
        metrics += [m for m in task.get("metrics", []) if m not in metrics]
        primary = primary or task.get("primary")
    return {"metrics": metrics, "primary": primary}


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per (job, method); failed jobs give one row with status 'failed'."""
    rows: list[dict[str, Any]] = []
    jobs = sorted((p for p in root.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (len(p.name), p.name))
    for job in jobs:
        over = _overrides(job)
        metrics_path = job / "metrics.json"
        if not metrics_path.exists():
            marker = next((job / m for m in (INTERRUPTED, FAILED) if (job / m).exists()), None)
            error = marker.read_text().strip().splitlines()[-1] if marker else "no metrics.json"
            rows.append({"job": job.name, "status": "failed", **over, "error": error[:200]})
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


def _mean_sd(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return f"{statistics.mean(vals):.4f} ± {sd:.4f}"


def seed_table(rows: list[dict[str, Any]], others: list[str], scores: list[str]
               ) -> list[dict[str, Any]]:
    """Per (other overrides, method): mean ± sd over seeds of each score, and for a steered
    method ``B+S`` the paired difference to its backbone ``B`` on the same seed (seeds
    draw different data, so the paired difference is the comparison that means something):
    ``"Δ vs": B`` and ``Δ<score>`` (``seed_columns`` names the columns)."""
    ok = [r for r in rows if r["status"] == "ok"]
    by_seed = {(tuple(str(r.get(k)) for k in others), r["method"], str(r.get("seed"))): r for r in ok}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((tuple(str(r.get(k)) for k in others), r["method"]), []).append(r)
    out = []
    for (over, method), members in groups.items():
        row: dict[str, Any] = {**dict(zip(others, over)), "method": method, "seeds": len(members)}
        for s in scores:
            vals = [m[s] for m in members if isinstance(m.get(s), (int, float))]
            if not vals:
                continue
            row[s] = _mean_sd(vals)
            base = method.split("+")[0]
            if base != method:
                deltas = [m[s] - by_seed[(over, base, str(m.get("seed")))][s] for m in members
                          if (over, base, str(m.get("seed"))) in by_seed]
                if deltas:
                    row["Δ vs"] = base
                    row[f"Δ{s}"] = _mean_sd(deltas)
        out.append(row)
    return out


def seed_columns(table: list[dict[str, Any]], others: list[str], scores: list[str]
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """The seed table's rows and columns for print: with one backbone to compare against,
    ``Δ<score> vs <backbone>`` columns; with several (a preset over backbones), one ``Δ vs``
    column naming each row's backbone and one ``Δ<score>`` column per score, instead of a
    sparse column per (score, backbone)."""
    score_cols = [s for s in scores if any(s in t for t in table)]
    bases = sorted({t["Δ vs"] for t in table if "Δ vs" in t})
    deltas = [f"Δ{s}" for s in score_cols if any(f"Δ{s}" in t for t in table)]
    cols = [*others, "method", "seeds", *score_cols]
    if len(bases) == 1:
        named = {d: f"{d} vs {bases[0]}" for d in deltas}
        table = [{named.get(k, k): v for k, v in t.items() if k != "Δ vs"} for t in table]
        return table, cols + list(named.values())
    return table, cols + (["Δ vs", *deltas] if bases else [])


def _num(v: Any) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _mean_by(rows: list[dict[str, Any]], keys: tuple[str, ...], metric: str) -> dict[tuple, float]:
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if isinstance(r.get(metric), (int, float)):
            acc.setdefault(tuple(r.get(k) for k in keys), []).append(r[metric])
    return {k: statistics.mean(v) for k, v in acc.items()}


def heatmap_axes(swept: list[str]) -> tuple[str, str] | None:
    """The heatmap's (row, column) parameters among the swept ones (seed excluded): the
    column is a strength; the row is the layer if it was swept, else the one other swept
    parameter. None when there is no strength or no unambiguous row."""
    strength = next((k for k in STRENGTH_KEYS if k in swept), None)
    if strength is None:
        return None
    layer = next((k for k in LAYER_KEYS if k in swept), None)
    others = [k for k in swept if k != strength]
    row = layer or (others[0] if len(others) == 1 else None)
    return (row, strength) if row else None


def heatmap_grid(rows: list[dict[str, Any]], method: str, row_key: str, col_key: str,
                 metric: str) -> tuple[list[Any], list[Any], list[list[float]]]:
    """One heatmap panel: the row and column values (numeric order) and, per cell, the mean
    of ``metric`` over the ok jobs of ``method`` with those values (seeds and any other
    swept parameter averaged); NaN where no job has them."""
    ok = [r for r in rows if r["status"] == "ok"]
    row_vals = sorted({r[row_key] for r in ok}, key=_num)
    col_vals = sorted({r[col_key] for r in ok}, key=_num)
    vals = _mean_by([r for r in ok if r["method"] == method], (row_key, col_key), metric)
    return row_vals, col_vals, [[vals.get((rv, cv), math.nan) for cv in col_vals] for rv in row_vals]


def plot_heatmap(rows: list[dict[str, Any]], row_key: str, col_key: str, metric: str,
                 path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    steered = sorted({r["method"] for r in ok if "+" in r["method"]})
    baseline = _mean_by([r for r in ok if "+" not in r["method"]], ("method",), metric)
    panels = {m: heatmap_grid(rows, m, row_key, col_key, metric) for m in steered}
    row_vals, col_vals = next(iter(panels.values()))[:2] if panels else ([], [])  # the same for all
    fig, axes = plt.subplots(1, len(steered), figsize=(1.6 + 1.1 * len(col_vals) * len(steered),
                                                      1.2 + 0.6 * len(row_vals)), squeeze=False)
    for ax, method in zip(axes[0], steered):
        grid = panels[method][2]
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                # dark text on the bright end of viridis, white on the dark end
                ax.text(j, i, "" if math.isnan(v) else f"{v:.3f}", ha="center", va="center",
                        color="k" if not math.isnan(v) and im.norm(v) > 0.6 else "w", fontsize=8)
        ax.set_xticks(range(len(col_vals)), col_vals)
        ax.set_yticks(range(len(row_vals)), row_vals)
        ax.set_xlabel(col_key)
        ax.set_ylabel(row_key)
        base = ", ".join(f"{m[0]} {v:.3f}" for m, v in baseline.items())
        seeds = len({r.get("seed") for r in ok})
        ax.set_title(f"{method}: {metric}" + (f", mean of {seeds} seeds" if seeds > 1 else "")
                     + (f"\nunsteered: {base}" if base else ""), fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_file(path, "the sweep's heatmap") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def plot_lines(rows: list[dict[str, Any]], key: str, metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in sorted({r["method"] for r in ok}):
        mine = [r for r in ok if r["method"] == method]
        if "+" not in method:  # unaffected by steering parameters: a baseline
            ax.axhline(statistics.mean(r[metric] for r in mine), ls="--", lw=1, color="gray")
            ax.annotate(method, (0.01, statistics.mean(r[metric] for r in mine)),
                        xycoords=("axes fraction", "data"), fontsize=8, color="gray")
            continue
        vals = _mean_by(mine, (key,), metric)
        xs = sorted(vals, key=lambda k: _num(k[0]))
        ax.plot([str(x[0]) for x in xs], [vals[x] for x in xs], marker="o", label=method)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key} (mean over any other swept parameter)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # none when every method failed
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, f"the sweep's plot of {metric} vs {key}") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


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
    task = task_of(root)
    # The task's scores, the aggregate entries that extend them (bootstrap medians,
    # per-type means), then counts and time.
    scores = task["metrics"]
    extended = sorted({k for r in rows for k in r
                       if any(k.startswith(f"{m}_") or k.endswith(f"/{m}") for m in scores)})
    shown = [k for k in ("n", *scores, *extended, "steering_n_pairs",
                         "steering_n_samples_unsteered", "seconds_generation")
             if any(k in r for r in rows)]
    columns = ["job", "status", *over_keys, "method", *shown]
    if any(r["status"] == "failed" for r in rows):
        columns.append("error")
    out = {"csv": root / "summary.csv", "md": root / "summary.md"}
    buffer = io.StringIO(newline="")
    w = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out["csv"], buffer.getvalue(), "the sweep's table (CSV)")
    write_text_atomic(out["md"], header + "\n\n" + markdown(rows, columns), "the sweep's table")
    if "seed" in over_keys:
        others = [k for k in over_keys if k != "seed"]
        # the task's scores, then their per-type means (function calling: search, ...)
        per_type = sorted({k for r in rows for k in r if any(k.endswith(f"/{m}") for m in scores)},
                          key=lambda k: (k.split("/")[0], scores.index(k.split("/", 1)[1])))
        scores = [*scores, *per_type]
        table = seed_table(rows, others, scores)
        out["seeds"] = root / "seeds.md"
        table, cols = seed_columns(table, others, scores)
        write_text_atomic(out["seeds"], header + "\n\nMean ± sample standard deviation over "
                          "seeds; Δ: paired difference to the method's backbone on the same "
                          "seed.\n\n" + markdown(table, cols), "the sweep's table over seeds")
    metric = task["primary"] if any(task["primary"] in r for r in rows) else None
    if metric:
        swept = [k for k in over_keys if k != "seed"]
        axes = heatmap_axes(swept)
        if axes:
            out["heatmap"] = plot_heatmap(rows, *axes, metric, root / f"heatmap_{metric}.png")
        for k in swept:
            out[f"vs_{k}"] = plot_lines(rows, k, metric, root / f"vs_{k}.png")
    out["readme"] = write_readme(root, out)
    return out


# The resolved config's settings a results README states (those a job has).
KEY_SETTINGS = ("dataset.name", "dataset.split", "dataset.benchmark", "model.name", "model.dtype",
                "retriever.name", "backbone.name", "steering.name", "steering.layer",
                "steering.alpha", "steering.beta", "steering.scale", "fidelity.name",
                "generation.max_new_tokens", "dataset.max_new_tokens")


def _get(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def sweep_command(root: Path) -> str:
    """The multirun's command line, from Hydra's ``multirun.yaml``."""
    path = root / "multirun.yaml"
    if not path.exists():
        return "(not recorded: no multirun.yaml)"
    hydra_cfg = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
    over = (hydra_cfg.get("overrides") or {}).get("task") or []
    sweep = (hydra_cfg.get("sweep") or {}).get("dir") or root.name
    return " ".join(["python -m fints_repro.run -m", *map(str, over), f"hydra.sweep.dir={sweep}"])


def write_readme(root: Path, tables: dict[str, Path]) -> Path:
    """``README.md`` of a results folder (see the module docstring). Jobs that recorded no
    provenance (older runs) are said to have none; the date then is their files'."""
    jobs = sorted(p.parent for p in root.glob("*/metrics.json"))
    prov = [json.loads((j / "metrics.json").read_text()).get("provenance") for j in jobs]
    known = [p for p in prov if p]
    commits = sorted({p["commit"] for p in known})
    dates = sorted(p["date"] for p in known)
    if known:
        machine = _machine_line(known[0]["machine"])
    else:
        machine = "not recorded by the jobs"
    if len(known) < len(jobs):
        import datetime
        mtimes = [datetime.datetime.fromtimestamp((j / "metrics.json").stat().st_mtime,
                                                  datetime.timezone.utc) for j in jobs]
        dates += [d.strftime("%Y-%m-%d %H:%M UTC (file time)") for d in sorted(mtimes)]
    settings: dict[str, set] = {}
    for j in jobs:
        cfg = yaml.safe_load((j / "config.yaml").read_text()) if (j / "config.yaml").exists() else {}
        for k in KEY_SETTINGS:
            v = _get(cfg or {}, k)
            if v is not None:
                settings.setdefault(k, set()).add(json.dumps(v))
    table_path = tables.get("seeds") or tables["md"]
    lines = [f"# {root.name}", "",
             f"- command: `{sweep_command(root)}`",
             f"- commit: {', '.join(commits) if commits else 'not recorded by the jobs'}"
             + (f" ({len(jobs) - len(known)} of {len(jobs)} jobs recorded none)"
                if known and len(known) < len(jobs) else ""),
             f"- date: {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else "- date: unknown",
             f"- machine: {machine}",
             f"- jobs: {len(jobs)}",
             "- key settings (the jobs' resolved configs; a preset's methods may override some): "
             + ", ".join(f"`{k}={'|'.join(sorted(v))}`" for k, v in settings.items()),
             "", f"## {table_path.name}", "", table_path.read_text().rstrip(), ""]
    out = root / "README.md"
    write_text_atomic(out, "\n".join(lines), "the results folder's README")
    return out


def _machine_line(m: dict[str, Any]) -> str:
    return (f"{m.get('gpu') + ', ' if m.get('gpu') else ''}{m.get('cpu')} "
            f"({m.get('cpu_cores')} cores), torch {m.get('torch')}, {m.get('threads')} threads")


def _published(root: Path) -> str | None:
    """The commit and date that last changed ``root``'s files in git, or None."""
    try:
        out = subprocess.run(["git", "-C", str(root), "log", "-1",
                              "--date=format-local:%Y-%m-%d %H:%M UTC", "--format=%h %ad", "--", "."],
                             capture_output=True, text=True, timeout=10, check=True,
                             env={**os.environ, "TZ": "UTC"}).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def write_folder_readme(root: Path, command: str, provenance: dict[str, Any] | None = None,
                        note: str = "") -> Path:
    """``README.md`` of a results folder that is not a multirun's (a script's output, or a
    run's tables published without their job folders): the command, the commit, the date
    and the machine, then every table (``*.md``) in it. ``provenance`` is what the run
    recorded (fints_repro.provenance); without it the commit and date are the ones that
    last changed the folder in git, and the README says so."""
    if provenance:
        made = [f"- commit: {provenance['commit']}", f"- date: {provenance['date']}",
                f"- machine: {_machine_line(provenance['machine'])}"]
    else:
        pub = _published(root)
        made = [f"- commit: not recorded by the run; the tables were last changed in commit "
                f"{pub.split(' ', 1)[0]} ({pub.split(' ', 1)[1]})" if pub
                else "- commit: not recorded by the run",
                "- machine: not recorded by the run"]
    tables = sorted(p for p in root.glob("*.md") if p.name != "README.md")
    lines = [f"# {root.name}", "", f"- command: `{command}`", *made]
    if note:
        lines += ["", note]
    for t in tables:
        lines += ["", f"## {t.name}", "", t.read_text().rstrip()]
    out = root / "README.md"
    write_text_atomic(out, "\n".join(lines) + "\n", "the results folder's README")
    return out


def write_merged(root: Path) -> list[Path]:
    """The sharded experiments under ``root`` merged (``shards.merge``), each merged folder
    with its ``summary.md``."""
    outs = merge(root)
    for out in outs:
        methods = json.loads((out / "metrics.json").read_text())["methods"]
        table = markdown([{"method": m, **v} for m, v in methods.items()],
                         ["method", *metric_keys(methods)])
        write_text_atomic(out / "summary.md", table, "the merged results table")
    return outs


class ReportCallback(Callback):
    """Hydra callback: write the report when a multirun ends (listed in conf/config.yaml),
    and merge the parts of a sharded experiment (``shard.count > 1``)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            for name, path in write_report(root).items():
                print(f"report {name}: {path}")
        except SystemExit as e:  # no job folders: nothing ran
            print(f"report: {e}")
            return
        if sharded_jobs(root):
            try:
                for out in write_merged(root):
                    print(f"merged: {out}")
            except DataError as e:  # a part failed: the report says which; merge after its rerun
                print(f"merge: {e}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        ap = argparse.ArgumentParser(
            prog="python -m fints_repro.report merge",
            description="join the parts of a sharded experiment (shard.count=N) into "
                        "SWEEP_DIR/merged/: rows in the whole run's order, scores recomputed")
        ap.add_argument("sweep_dir", type=Path)
        a = ap.parse_args(argv[1:])
        try:
            outs = write_merged(a.sweep_dir)
        except DataError as e:
            raise SystemExit(f"merge: {e}") from e
        for out in outs:
            print(f"merged: {out}\n{(out / 'summary.md').read_text()}")
        return
    if argv[:1] == ["readme"]:
        ap = argparse.ArgumentParser(
            prog="python -m fints_repro.report readme",
            description="README.md for a results folder that holds tables but no job folders")
        ap.add_argument("folder", type=Path)
        ap.add_argument("--command", required=True, help="the command that made the tables")
        ap.add_argument("--note", default="", help="a line under the provenance")
        a = ap.parse_args(argv[1:])
        if not a.folder.is_dir():
            raise SystemExit(f"{a.folder}: not a folder")
        print(write_folder_readme(a.folder, a.command, note=a.note))
        return
    ap = argparse.ArgumentParser(description="multirun results -> summary tables "
                                 "(or: readme FOLDER --command CMD)")
    ap.add_argument("multirun_dir", type=Path)
    args = ap.parse_args(argv)
    for name, path in write_report(args.multirun_dir).items():
        print(f"{name}: {path}")
    print((args.multirun_dir / "summary.md").read_text())
    if (args.multirun_dir / "seeds.md").exists():
        print((args.multirun_dir / "seeds.md").read_text())


if __name__ == "__main__":
    main()
