"""Time the multirun report on a 100-job sweep dir (10 layers x 10 strengths, 2 methods).

    python scripts/bench_report.py [--jobs-per-axis 10]

The job folders are written the way a Hydra multirun writes them (`.hydra/overrides.yaml`,
`metrics.json`), with made-up scores; only the report is timed.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from fints_repro.report import write_report


def fake_sweep(root: Path, n: int) -> None:
    rng = random.Random(0)
    job = 0
    for layer in range(n):
        for k in range(n):
            d = root / str(job)
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "overrides.yaml").write_text(
                f"- +exp=demo_sweep\n- steering.layer={layer}\n- steering.scale={0.25 * (k + 1)}\n")
            methods = {m: {"n": 32, "rouge1": rng.random(), "rougeL": rng.random(),
                           "seconds_generation": 30.0} for m in ("rag", "rag+fine_grained")}
            task = {"name": "text_gen", "metrics": ["rouge1", "rougeL"], "primary": "rougeL"}
            (d / "metrics.json").write_text(json.dumps({"task": task, "methods": methods}))
            job += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs-per-axis", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fake_sweep(root, args.jobs_per_axis)
        t0 = time.perf_counter()
        out = write_report(root)
        dt = time.perf_counter() - t0
        print(json.dumps({"jobs": args.jobs_per_axis ** 2, "seconds": round(dt, 2),
                          "files": sorted(p.name for p in out.values())}, indent=1))


if __name__ == "__main__":
    main()
