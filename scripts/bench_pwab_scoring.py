"""Scoring a run's tool calls in one batch against one call at a time (demo_pwab data).

    python scripts/bench_pwab_scoring.py [--repeats 3] [--copies 4]

The calls are each test task's gold call, ``--copies`` times over (search, recommend and
review in equal shares). Batched: one ``execute`` (one BM25 index build for every query,
one recommender, one encoder call for every review); one at a time: ``execute`` per
call. Both give the same scores (checked); the best of ``--repeats`` is reported.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4)
    args = ap.parse_args()

    from fints_repro.compose import compose_run
    from fints_repro.data.load import load_samples
    from fints_repro.tasks import build_task
    from fints_repro.tasks.function_calling import execute

    cfg = compose_run(["+exp=demo_pwab"])
    samples = load_samples(cfg.dataset, seed=0) * args.copies
    task = build_task(cfg.dataset, cfg.generation, cfg.eval, 0)
    env = task.environment
    calls = [task.parse(s.target) for s in samples]
    cols = ([s.type for s in samples], [s.meta["target_asin"] for s in samples],
            [s.meta["target_review"] for s in samples])
    env.review_similarity(["warm-up"], ["warm-up"])  # the encoder is loaded once, not timed

    def batched():
        return execute(env, calls, *cols)

    def one_by_one():
        return [execute(env, [c], [t], [a], [r])[0] for c, t, a, r in zip(calls, *cols)]

    times = {}
    for name, fn in (("batched", batched), ("one at a time", one_by_one)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = (best, out)
    a, b = times["batched"][1], times["one at a time"][1]
    assert [x.result_accuracy for x in a] == [x.result_accuracy for x in b] or all(
        abs(x.result_accuracy - y.result_accuracy) < 1e-5 for x, y in zip(a, b))
    n = len(calls)
    for name, (t, _) in times.items():
        print(f"{name:>14}: {t:.3f} s for {n} calls ({1000 * t / n:.2f} ms per call)")
    print(f"speed-up: {times['one at a time'][0] / times['batched'][0]:.1f}x")


if __name__ == "__main__":
    main()
