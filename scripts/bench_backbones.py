"""The parametric backbones' costs on the demo, default model:

1. per-user LoRA adapters: one mixed batch of B rows over B users (each row its own
   adapter, PEFT's ``adapter_names``) vs the same rows one user at a time (that user's
   adapter, batch 1), on zero-shot prompts: samples/s ratio; and with each row also
   carrying its own fine-grained steering vectors (nobody else batches both);
2. the seconds to train one user's adapter (``backbone=lora`` settings; adapters trained
   into a scratch cache, so nothing is reused);
3. best-of-N: N sampled candidates per prompt in one batched call (``num_return_sequences``)
   vs N calls of one candidate: samples/s ratio, on RAG prompts.

    python scripts/bench_backbones.py [--users 8] [--repeats 2] [--n 4]

Each timing is the best of --repeats runs after one untimed warm-up; progress lines go to
stderr, the results (JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def note(what: str, result) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {what}: {json.dumps(result)}",
          file=sys.stderr, flush=True)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=8, help="users (one row each) in the mixed batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, default=4, help="candidates per prompt (best-of-N)")
    args = ap.parse_args()

    from fints_repro import stages
    from fints_repro.backbones import FitContext, build_backbone
    from fints_repro.compose import compose_run
    from fints_repro.models.generation import DecodingParams, generate_batches
    from fints_repro.models.chat import render_chat

    overrides = ["+exp=demo", "backbone=lora", "logger=none", "progress=false", "fidelity=ours",
                 "steering.pairs.max_new_tokens=null"]
    res = stages.open_run(overrides)
    cfg, samples, lm, task = res.cfg, res.samples, res.lm, res.task
    method = stages.config_method(cfg)  # lora + fine_grained
    out: dict = {"model": lm.fingerprint, "device": str(lm.device),
                 "threads": torch.get_num_threads(), "users": args.users,
                 "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    # 2. training seconds per user, into a scratch cache
    by_user: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_user.setdefault(s.user, []).append(i)
    users = sorted(by_user)[: args.users]
    rows = [by_user[u][0] for u in users]  # one test row per user
    sub = [samples[i] for u in users for i in by_user[u]]
    with tempfile.TemporaryDirectory() as scratch:
        bb = build_backbone(cfg.backbone, task, res.retriever)
        scratch_ctx = FitContext(cache_dir=Path(scratch), seed=cfg.seed)
        t0 = time.perf_counter()
        bb.fit(lm, sub[: len(by_user[users[0]])], scratch_ctx)
        out["lora_train_seconds_one_user"] = round(time.perf_counter() - t0, 2)
        out["lora_train_items_one_user"] = len(samples[by_user[users[0]][0]].history)
        bb.close(lm)
    note("lora training, one user", {k: out[k] for k in ("lora_train_seconds_one_user",
                                                          "lora_train_items_one_user")})

    # 1. mixed-adapter batch vs one user at a time (adapters from the run's cache)
    backbone = build_backbone(cfg.backbone, task, res.retriever)
    plm = stages.fit(res, method, backbone, lm)
    texts = [render_chat(lm.tokenizer, p.text, lm.system_prompt)
             for p in backbone.build_prompts([samples[i] for i in rows])]
    params = DecodingParams(max_new_tokens=cfg.dataset.max_new_tokens)
    plan = stages.steering_plan(res, method, backbone, plm)

    def gen(batch: int, steered: bool) -> None:
        def ctx(rs):
            import contextlib

            @contextlib.contextmanager
            def both():
                with backbone.model_context(lm, [rows[r] for r in rs]) as kw:
                    if steered:
                        with plan.batch_context(plm.model)([rows[r] for r in rs]):
                            yield kw
                    else:
                        yield kw
            return both()

        for _ in generate_batches(plm, texts, params, batch_size=batch, progress=False,
                                  batch_context=ctx):
            pass

    res1 = {}
    for steered in (False, True):
        t_one = best_of(lambda: gen(1, steered), args.repeats)
        t_mix = best_of(lambda: gen(len(rows), steered), args.repeats)
        key = "mixed_adapters" + ("_and_vectors" if steered else "")
        res1[key] = {"one_user_at_a_time_samples_per_s": round(len(rows) / t_one, 3),
                     f"mixed_batch{len(rows)}_samples_per_s": round(len(rows) / t_mix, 3),
                     "ratio": round(t_one / t_mix, 2)}
        note(key, res1[key])
    out.update(res1)
    backbone.close(lm)

    # 3. best-of-N: one call with N return sequences vs N calls
    rag_cfg = compose_run(["+exp=demo", "backbone=rag", "logger=none"]).backbone
    rag = build_backbone(rag_cfg, task, res.retriever)
    rag_texts = [render_chat(lm.tokenizer, p.text, lm.system_prompt)
                 for p in rag.build_prompts([samples[i] for i in rows])]
    sampled = DecodingParams(max_new_tokens=cfg.dataset.max_new_tokens, do_sample=True,
                             temperature=0.8, top_p=0.95, seed=cfg.seed)

    def one_call():
        for _ in generate_batches(lm, rag_texts, sampled, batch_size=len(rows), progress=False,
                                  num_return_sequences=args.n):
            pass

    def n_calls():
        for c in range(args.n):
            p = DecodingParams(**{**sampled.__dict__, "seed": cfg.seed + c})
            for _ in generate_batches(lm, rag_texts, p, batch_size=len(rows), progress=False):
                pass

    t1, tn = best_of(one_call, args.repeats), best_of(n_calls, args.repeats)
    out["best_of_n"] = {"n": args.n, "prompts": len(rag_texts),
                        "n_calls_samples_per_s": round(len(rag_texts) / tn, 3),
                        "one_call_samples_per_s": round(len(rag_texts) / t1, 3),
                        "ratio": round(tn / t1, 2)}
    note("best_of_n", out["best_of_n"])
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
