"""The style demo's answer to the paper's claim, from the sweep's and the seeds' tables.

    python scripts/demo_style_report.py [--sweep outputs/sweep-demo-style]
        [--seeds outputs/repro-demo-style] [--layer 15] [--out results/repro-demo-style]

Writes into ``--out``:

- ``claim.md``: per seed and as mean ± sample sd over seeds, the topic users' style rate
  (casual on sports, formal on politics, both halves) of each method, and the paired
  difference fine-grained − CAA (seeds draw different users, so the paired difference is
  the comparison); the same for every user kind;
- ``style_vs_strength.png`` (from the sweep at ``--layer``): the casual users' casual rate
  and the topic users' style rate on sports and on politics against the strength, for
  CAA and fine-grained, the unsteered RAG baseline dashed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAA, FG = "rag+caa", "rag+fine_grained"
# (column of summary.csv, what it is): the rates the claim is read from
RATES = [("topic_casual/style", "topic users, sports (casual wanted)"),
         ("topic_formal/style", "topic users, politics (formal wanted)"),
         ("casual/style", "casual users"), ("formal/style", "formal users"),
         ("positive/style", "positive users"), ("style", "all users")]


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "ok"]


def num(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def topic_rate(row: dict[str, str]) -> float | None:
    """Both halves of the topic users (equal in size: each user's test items are half
    sports, half politics)."""
    a, b = num(row.get("topic_casual/style")), num(row.get("topic_formal/style"))
    return None if a is None or b is None else (a + b) / 2


def mean_sd(vals: list[float]) -> str:
    if not vals:
        return ""
    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def claim_table(rows: list[dict[str, str]]) -> str:
    seeds = sorted({r["seed"] for r in rows}, key=int)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    at = {(r["seed"], r["method"]): r for r in rows}
    cols = [("topic", "topic users, both halves")] + RATES
    lines = ["| method | " + " | ".join(name for _, name in cols) + " |",
             "|---|" + "---|" * len(cols)]

    def value(row: dict[str, str], key: str) -> float | None:
        return topic_rate(row) if key == "topic" else num(row.get(key))

    for m in methods:
        cells = []
        for key, _ in cols:
            vals = [v for s in seeds if (s, m) in at and (v := value(at[s, m], key)) is not None]
            cells.append(mean_sd(vals))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    diffs = []
    for key, _ in cols:
        vals = [value(at[s, FG], key) - value(at[s, CAA], key) for s in seeds
                if (s, FG) in at and (s, CAA) in at and value(at[s, FG], key) is not None
                and value(at[s, CAA], key) is not None]
        diffs.append(mean_sd(vals))
    lines.append(f"| **Δ {FG} − {CAA}** (paired by seed) | " + " | ".join(diffs) + " |")
    per_seed = ["", f"Per seed, {FG} − {CAA} on the topic users (both halves): " + ", ".join(
        f"seed {s}: {topic_rate(at[s, FG]) - topic_rate(at[s, CAA]):+.3f}" for s in seeds
        if (s, FG) in at and (s, CAA) in at)]
    n = num(next(iter(at.values())).get("n"))
    return "\n".join([f"Mean ± sample sd over seeds {', '.join(seeds)} of the `style` metric's "
                      f"rate ({int(n or 0)} rows per seed).", "", *lines, *per_seed, ""])


def plot(rows: list[dict[str, str]], layer: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r.get("steering.layer") == layer]
    if not mine:
        raise SystemExit(f"the sweep has no job at steering.layer={layer}")
    panels = [("casual/style", "casual users: casual rate"),
              ("topic_casual/style", "topic users, sports: casual rate"),
              ("topic_formal/style", "topic users, politics: formal rate")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        base = [num(r[key]) for r in mine if r["method"] == "rag" and num(r.get(key)) is not None]
        if base:
            ax.axhline(statistics.mean(base), ls="--", lw=1, color="gray", label="rag (unsteered)")
        for method in (CAA, FG, "rag+caa(attn+mlp)"):
            pts = sorted((float(r["steering.scale"]), num(r[key])) for r in mine
                         if r["method"] == method and num(r.get(key)) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("strength (steering.scale)")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("share of fluent headlines in the wanted style")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"demo_style sweep, layer {layer} (seed 0, 16 casual + 16 topic rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="outputs/sweep-demo-style")
    ap.add_argument("--seeds", default="outputs/repro-demo-style")
    ap.add_argument("--layer", default="15")
    ap.add_argument("--out", default="results/repro-demo-style")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = Path(a.seeds) / "summary.csv"
    if seeds.exists():
        (out / "claim.md").write_text(claim_table(read(seeds)))
        print(f"wrote {out / 'claim.md'}")
    sweep = Path(a.sweep) / "summary.csv"
    if sweep.exists():
        plot(read(sweep), a.layer, out / "style_vs_strength.png")
        print(f"wrote {out / 'style_vs_strength.png'}")


if __name__ == "__main__":
    main()
