"""Does the trained per-user reward model rank its user's *held-out* pairs right on the demo?

For each seed: the demo's contrastive pairs (``+exp=demo_backbones``: fidelity=ours, the
same cached pairs steering and ``backbone=reward_model`` use) are split per user, every
``--every``-th pair held out; one reward model per user is trained on the rest exactly as
``backbone=reward_model reward=trained`` trains it (TRL's RewardTrainer, LoRA + a one-label
head on the run's model), then scores each held-out (chosen, rejected). Printed: the share
of held-out pairs with r(chosen) > r(rejected), per seed and pooled, with a one-sided sign
test against chance (0.5), and the same share for the untrained head (the reward before
training) as the floor it has to beat.

    python scripts/reward_heldout.py [--seeds 0 1 2] [--every 4]

Reward models are cached under the run's cache (``reward_models/``) by the content hash of
their training pairs, so a second call only scores. Progress lines go to stderr, the
results (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def note(what: str, result) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}: {json.dumps(result)}", file=sys.stderr, flush=True)


def sign_test(wins: int, n: int) -> float:
    """One-sided binomial p-value of at least ``wins`` of ``n`` under p = 0.5."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n if n else 1.0


def split(pairs: dict, every: int) -> tuple[dict, dict]:
    """Per user, every ``every``-th pair (in the cached order) held out, the rest trained on;
    a user with fewer than two pairs keeps them all for training and holds none out."""
    train, held = {}, {}
    for user, ps in pairs.items():
        if len(ps) < 2:
            train[user] = list(ps)
            continue
        held[user] = [p for i, p in enumerate(ps) if i % every == every - 1] or [ps[-1]]
        train[user] = [p for p in ps if p not in held[user]]
    return train, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--every", type=int, default=4, help="hold out every N-th pair of a user")
    args = ap.parse_args()

    import fints_repro.backbones.reward_model as rm_mod
    import fints_repro.backbones.reward_trained as trained
    from fints_repro.backbones import build_backbone
    from fints_repro.data.schema import Sample
    from fints_repro.stages import config_method, open_run

    out: dict = {"every": args.every, "seeds": {}}
    totals = [0, 0, 0]  # held-out pairs, ranked right trained, ranked right untrained
    for seed in args.seeds:
        overrides = ["+exp=demo_backbones", "backbone=reward_model", "logger=none",
                     "progress=false", f"seed={seed}"]
        res = open_run(overrides)
        cfg, samples, lm, task = res.cfg, res.samples, res.lm, res.task
        fit_ctx = res.fit_context(config_method(cfg))
        pairs = rm_mod.reward_pairs(cfg.steering.pairs, samples, fit_ctx.pair_source)
        train, held = split(pairs, args.every)
        bb = build_backbone(cfg.backbone, task, res.retriever)
        t0 = time.perf_counter()
        bb.fit(lm, samples, fit_ctx, pairs=train)
        fit_s = time.perf_counter() - t0
        rows = [(Sample(f"{p.user}:{p.item_id}", p.user, p.prompt, None), p)
                for ps in held.values() for p in ps]
        selector = bb.selector
        scores = selector.reward_scores([s for s, _ in rows], [[p.chosen, p.rejected] for _, p in rows])
        # the floor: the same encoder and heads before training (no adapter, pristine head)
        selector.encoder.reset_heads()
        seqs = [selector.sequence_ids(p.prompt, c) for _, p in rows for c in (p.chosen, p.rejected)]
        raw = trained.score_sequences(selector.encoder.model, seqs, lm.tokenizer.pad_token_id,
                                      bb.rm.score_batch_size)
        bb.close(lm)
        per_user: dict[str, list[int]] = {}
        wins = floor = n = 0
        for (_, p), r, u in zip(rows, scores, zip(raw[0::2], raw[1::2])):
            if r is None:  # a user without a reward model
                continue
            w = per_user.setdefault(p.user, [0, 0])
            w[0] += r[0] > r[1]
            w[1] += 1
            wins, floor, n = wins + (r[0] > r[1]), floor + (u[0] > u[1]), n + 1
        totals = [totals[0] + n, totals[1] + wins, totals[2] + floor]
        result = {"pairs": sum(len(v) for v in pairs.values()),
                  "train_pairs": sum(len(v) for v in train.values()), "held_out": n,
                  "accuracy": round(wins / n, 4) if n else None,
                  "p_value_vs_chance": round(sign_test(wins, n), 6),
                  "untrained_accuracy": round(floor / n, 4) if n else None,
                  "per_user": {u: f"{w}/{m}" for u, (w, m) in sorted(per_user.items())},
                  "seconds_fit": round(fit_s, 1),
                  "reward_models_trained": bb.metrics().get("backbone_n_reward_models_trained")}
        out["seeds"][seed] = result
        note(f"seed {seed}", result)
    n, w, f = totals
    out["pooled"] = {"held_out": n, "accuracy": round(w / n, 4) if n else None,
                     "p_value_vs_chance": round(sign_test(w, n), 6),
                     "untrained_accuracy": round(f / n, 4) if n else None}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
