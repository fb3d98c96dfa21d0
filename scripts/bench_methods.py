"""What each steering method costs to prepare, per user, on the embedded data: from the
same contrastive pairs (read from the project's pair cache, made first if absent) to the
per-sample vectors, with an empty cache for everything after the pairs (extraction, BiPO
training, SteerX's log-prob passes and descriptions), so each method pays its own model
time once, as a cold run does.

    python scripts/bench_methods.py [--exp demo_methods] [--seed 0] [--out results/bench-methods]
                                    [--only NAME ...] [OVERRIDE ...]

Methods: the ``methods`` of the preset that steer (each with its own overrides), plus
SteerX(CAA) with ``use_description``. Writes ``methods.json`` and ``methods.md`` (seconds
in all and per user with pairs; wall clock, this process's threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="demo_methods")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench-methods")
    ap.add_argument("--only", nargs="*", default=None, help="method names to time (default: all)")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. model=tiny_random_llama)")
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from fints_repro import stages
    from fints_repro.backbones import build_backbone
    from fints_repro.provenance import command_line, provenance
    from fints_repro.report import markdown, write_folder_readme
    from fints_repro.preferences import user_pairs

    base = [f"+exp={args.exp}", "logger=none", "progress=false", f"seed={args.seed}", *args.overrides]
    run = stages.open_run(base)
    samples, lm, task = run.samples, run.lm, run.task
    methods = [m for m in OmegaConf.to_container(OmegaConf.load(
        Path(__file__).resolve().parents[1] / "conf" / "exp" / f"{args.exp}.yaml"))["methods"]
        if m.get("steering")]
    methods.append({"steering": "steerx", "name": "rag+steerx(caa)+description",
                    "overrides": {"steering.steerx.base": "caa",
                                  "steering.steerx.use_description": True}})
    if args.only:
        methods = [m for m in methods if (m.get("name") or f"rag+{m['steering']}") in args.only]
    n_users = len({s.user for s in samples})
    out: dict = {"exp": args.exp, "seed": args.seed, "model": lm.fingerprint,
                 "device": str(lm.device), "threads": torch.get_num_threads(),
                 "n_users": n_users, "n_samples": len(samples), "methods": {}}
    for m in methods:
        over = [f"steering={m['steering']}",
                *(f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                  for k, v in (m.get("overrides") or {}).items())]
        res = stages.open_run(base + over, with_model=False)
        res.lm = lm
        mcfg = res.cfg
        # the pairs from the project's cache (made once), everything after them cold
        user_pairs(mcfg.steering.pairs, samples, res.steering_inputs(mcfg.steering))
        with tempfile.TemporaryDirectory() as cold:
            os.symlink(Path(mcfg.cache_dir).resolve() / "pairs", Path(cold) / "pairs")
            res.cfg = dataclasses.replace(mcfg, cache_dir=cold)
            backbone = build_backbone(mcfg.backbone, task, res.retriever)
            t0 = time.perf_counter()
            plan = stages.steering_plan(res, stages.config_method(mcfg), backbone, lm)
            seconds = time.perf_counter() - t0
        name = m.get("name") or f"rag+{m['steering']}"
        users = len({s.user for s, st in zip(samples, plan.steered) if st})  # steered users
        out["methods"][name] = {"seconds": round(seconds, 2), "users_steered": users,
                                "n_pairs": plan.stats.get("n_pairs"),
                                "seconds_per_user": round(seconds / max(users, 1), 2)}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(out['methods'][name])}",
              file=sys.stderr, flush=True)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "methods.json").write_text(json.dumps(out, indent=2))
    text = (f"Preparation cost per method ({args.exp}, seed {args.seed}, {out['device']}, "
            f"{out['threads']} threads; pairs shared and cached, everything after them cold)\n\n"
            + markdown([{"method": name, **r} for name, r in out["methods"].items()],
                       ["method", "n_pairs", "users_steered", "seconds", "seconds_per_user"]))
    (dest / "methods.md").write_text(text)
    write_folder_readme(dest, command_line(), provenance())
    print(text)


if __name__ == "__main__":
    main()
