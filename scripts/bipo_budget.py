"""How far BiPO's training budget moves its vector: one user's BiPO vector trained from the
same cached contrastive pairs under the preset's budget (``+exp=demo_methods``: 1 epoch at
lr 2e-2) and under the authors' code's (``conf/steering/bipo.yaml``: 20 epochs at lr 5e-4),
with the steps, seconds, loss and the vectors' norm and cosine.

    python scripts/bipo_budget.py [--exp demo_methods] [--seed 0] [--user demo_user_00]
                                  [--out results/bipo-budget] [OVERRIDE ...]

Nothing is cached (the vectors are trained here, not read from the project's cache); the
pairs come from the project's pair cache (made first if absent). Writes ``budget.json`` and
``budget.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="demo_methods")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--user", default=None, help="user id (default: the first user with pairs)")
    ap.add_argument("--out", default="results/bipo-budget")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from fints_repro.stages import open_run
    from fints_repro.provenance import command_line, provenance
    from fints_repro.report import markdown, write_folder_readme
    from fints_repro.steering.methods.bipo import train_vector, validate
    from fints_repro.preferences import user_pairs

    over = [f"+exp={args.exp}", "logger=none", "progress=false", f"seed={args.seed}",
            "steering=bipo", *args.overrides]
    run = open_run(over)
    cfg, samples, lm = run.cfg, run.samples, run.lm
    inputs = run.steering_inputs(cfg.steering)
    by_user = user_pairs(cfg.steering.pairs, samples, inputs)
    user = args.user or next(u for u, ps in by_user.items() if ps)
    if not by_user.get(user):
        raise SystemExit(f"user {user!r} has no contrastive pairs on seed {args.seed} "
                         f"(users with pairs: {', '.join(u for u, ps in by_user.items() if ps)})")
    pairs = by_user[user]
    layer = validate(cfg.steering, lm, inputs.layers_path)
    code = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "steering" / "bipo.yaml"))["bipo"]
    budgets = {"preset": cfg.steering.bipo, "code": dataclasses.replace(cfg.steering.bipo, **code)}
    out: dict = {"exp": args.exp, "seed": args.seed, "user": user, "n_pairs": len(pairs),
                 "layer": layer, "model": lm.fingerprint, "threads": torch.get_num_threads(),
                 "budgets": {}}
    vecs = {}
    for name, b in budgets.items():
        t0 = time.perf_counter()
        v, losses = train_vector(lm, pairs, layer, b, tokenization=cfg.steering.answer_tokenization,
                                 layers_path=inputs.layers_path, seed=inputs.seed)
        vecs[name] = v
        out["budgets"][name] = {"epochs": b.epochs, "max_steps": b.max_steps, "lr": b.lr,
                                "steps": len(losses), "seconds": round(time.perf_counter() - t0, 1),
                                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                                "loss_min": round(min(losses), 4), "norm": round(v.norm().item(), 4)}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(out['budgets'][name])}", flush=True)
    out["cosine"] = round(torch.nn.functional.cosine_similarity(vecs["preset"], vecs["code"], dim=0).item(), 4)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "budget.json").write_text(json.dumps(out, indent=2))
    text = (f"BiPO's budget ({args.exp}, seed {args.seed}, user {user}: {len(pairs)} pairs, "
            f"layer {layer}, {out['threads']} threads); cosine(preset, code) = {out['cosine']}\n\n"
            + markdown([{"budget": name, **r} for name, r in out["budgets"].items()],
                       ["budget", "epochs", "lr", "steps", "seconds", "loss_first", "loss_last",
                        "loss_min", "norm"]))
    (dest / "budget.md").write_text(text)
    write_folder_readme(dest, command_line(), provenance())
    print(text)


if __name__ == "__main__":
    main()
