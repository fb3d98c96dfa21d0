"""Speed of the steering stages on the default model (CPU or GPU), measured in one run:

1. steered vs unsteered generation, same batch and prompts, same number of new tokens
   (min_new_tokens = max_new_tokens): tokens/s ratio;
2. fine-grained steering, batch B with per-row vectors vs the same samples one at a time
   (batch 1, each with its own vectors): samples/s ratio, on RAG and zero-shot prompts,
   with the bound the prefill puts on it (and, with --ablate, the batched run also with
   transformers' static KV cache, timed interleaved with the default cache);
3. extraction at 2/3 depth, batched with early stop vs one pair at a time through the
   whole model: pairs/s ratio.

    python scripts/bench_steering.py [--n 16] [--batch 8] [--repeats 2] [--ablate]
                                     [--cache-implementation static] [--cpu-time]

Uses the demo's pairs and vectors (computed and cached on first use, as `make demo` does).
Each timing is the best of --repeats runs, steered and unsteered interleaved. On a machine
shared with other jobs, wall-clock times with 2 OpenMP threads are mostly the other jobs'
(threads spin at barriers while descheduled); --cpu-time times this process's CPU time on
one thread instead: ratios robust to the load, but of one core, not of the whole machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def note(what: str, result) -> None:
    """Each part's result on stderr as soon as it is measured (a loaded machine makes the
    whole run long), with the load average."""
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {what}: {json.dumps(result)}",
          file=sys.stderr, flush=True)


def best_of(fn, repeats: int) -> float:
    return timed_best(fn, repeats)[0]


CLOCK = time.perf_counter  # time.process_time with --cpu-time


def timed_best(fn, repeats: int) -> tuple[float, object]:
    """(the best time of ``repeats`` calls, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = CLOCK()
        result = fn()
        best = min(best, CLOCK() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="samples for the generation timings")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=32, help="pairs for the extraction timing")
    ap.add_argument("--ablate", action="store_true",
                    help="also time batch B with transformers' static KV cache")
    ap.add_argument("--cache-implementation", default=None,
                    help="transformers' KV cache (default: its dynamic cache), e.g. static")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU time on one thread (a shared machine)")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)

    from fints_repro import stages
    from fints_repro.backbones import build_backbone
    from fints_repro.models.generation import DecodingParams, generate_batches
    from fints_repro.models.chat import render_chat
    from fints_repro.steering.extract import answer_means
    from fints_repro.steering.methods.common import prepare

    # The vectors only need to exist: our pairs (fidelity=ours) are the quick ones to make.
    overrides = ["+exp=demo", "logger=none", "progress=false", "fidelity=ours",
                 "steering.pairs.max_new_tokens=null"]  # as the demo's rag+...(ours) rows
    res = stages.open_run(overrides)
    cfg, samples, lm, task = res.cfg, res.samples, res.lm, res.task
    method = stages.config_method(cfg)  # rag + fine_grained
    plan = stages.steering_plan(res, method, build_backbone(cfg.backbone, task, res.retriever), lm)
    inputs = res.steering_inputs(cfg.steering)
    sub = list(range(min(args.n, len(samples))))
    max_new = cfg.dataset.max_new_tokens
    out: dict = {"model": lm.fingerprint, "device": str(lm.device),
                 "threads": torch.get_num_threads(), "n_samples": len(sub), "batch": args.batch,
                 "layer": plan.stats["layer"], "cache_implementation": args.cache_implementation,
                 "clock": "process CPU time" if args.cpu_time else "wall",
                 "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    def texts_for(backbone: str) -> list[str]:
        bcfg = OmegaConf.to_object(OmegaConf.merge(
            OmegaConf.structured(type(cfg.backbone)), {"name": backbone}))
        prompts = build_backbone(bcfg, task, res.retriever).build_prompts(
            [samples[i] for i in sub])
        return [render_chat(lm.tokenizer, p.text, lm.system_prompt) for p in prompts]

    def gen(texts, batch_size, steered, fixed_length, max_new_tokens=max_new,
            cache_implementation=args.cache_implementation):
        params = DecodingParams(max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens if fixed_length else 0)
        ctx = (lambda rows: plan.batch_context(lm.model)([sub[r] for r in rows])) if steered else None
        n_tok = 0
        for _, gens in generate_batches(lm, texts, params, batch_size=batch_size, progress=False,
                                        batch_context=ctx,
                                        cache_implementation=cache_implementation):
            n_tok += sum(len(lm.tokenizer(g, add_special_tokens=False)["input_ids"]) for g in gens)
        return n_tok

    note("ready (vectors prepared), timing", {k: out[k] for k in ("n_samples", "batch", "layer")})
    rag = texts_for("rag")
    gen(rag[: args.batch], args.batch, True, True)  # warm-up
    # 1. steered vs unsteered, same batch, same number of new tokens
    tokens = len(rag) * max_new
    t_plain = t_steer = float("inf")
    for _ in range(args.repeats):  # interleaved: a change of the machine's load hits both
        t_plain = min(t_plain, best_of(lambda: gen(rag, args.batch, False, True), 1))
        t_steer = min(t_steer, best_of(lambda: gen(rag, args.batch, True, True), 1))
    out["steered_vs_unsteered"] = {
        "unsteered_tokens_per_s": round(tokens / t_plain, 2),
        "steered_tokens_per_s": round(tokens / t_steer, 2),
        "ratio": round(t_plain / t_steer, 3)}
    note("steered_vs_unsteered", out["steered_vs_unsteered"])

    # 2. batch B with per-row vectors vs one at a time. `prefill_bound` is the ratio if
    # batched decoding cost nothing: one-at-a-time time / batched prefill time (a prefill
    # is compute-bound on a CPU and gains little from batching). With --ablate the batched
    # run is also timed with the static KV cache, the two interleaved pass by pass so that
    # a change of the machine's load hits both alike.
    def n_tokens(ts):
        return [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ts]

    for name, texts in (("rag", rag), ("zero_shot", texts_for("zero_shot"))):
        t1, n_new = timed_best(lambda: gen(texts, 1, True, False), args.repeats)
        other = "static" if args.cache_implementation is None else None
        variants = {"default": {}, **({"other": {"cache_implementation": other}}
                                      if args.ablate else {})}
        tb = {v: float("inf") for v in variants}
        for _ in range(args.repeats):
            for v, kw in variants.items():
                tb[v] = min(tb[v], best_of(lambda: gen(texts, args.batch, True, False, **kw), 1))
        t_prefill = best_of(lambda: gen(texts, args.batch, True, True, max_new_tokens=1),
                            args.repeats)
        t_batch = tb["default"]
        res = {"mean_prompt_tokens": round(sum(n_tokens(texts)) / len(texts), 1),
               "mean_new_tokens": round(n_new / len(texts), 1),
               "single_samples_per_s": round(len(texts) / t1, 3),
               f"batch{args.batch}_samples_per_s": round(len(texts) / t_batch, 3),
               "ratio": round(t1 / t_batch, 2),
               "prefill_bound": round(t1 / t_prefill, 2)}
        if args.ablate:
            res[f"batch{args.batch}_cache_{other or 'dynamic'}_samples_per_s"] = round(
                len(texts) / tb["other"], 3)
            res[f"ratio_cache_{other or 'dynamic'}"] = round(t1 / tb["other"], 2)
        out[f"batch_vs_single_{name}"] = res
        note(f"batch_vs_single_{name}", res)

    # 3. extraction: batched + early stop vs one pair at a time through the whole model
    pv = prepare(cfg.steering, lm, samples, inputs)
    pairs = pv.pairs[: args.pairs]
    qs, ans = [p.prompt for p in pairs], [p.chosen for p in pairs]
    layer = pv.layer

    def extract(batch_size, stop_early):
        answer_means(lm, qs, ans, layer, ["attn", "mlp"], batch_size=batch_size,
                     stop_early=stop_early, progress=False)

    extract(args.batch, True)  # warm-up
    t_fast = best_of(lambda: extract(args.batch, True), args.repeats)
    t_slow = best_of(lambda: extract(1, False), args.repeats)
    out["extraction"] = {"n_sequences": len(qs), "layer": layer,
                         "one_at_a_time_full_model_seq_per_s": round(len(qs) / t_slow, 2),
                         f"batch{args.batch}_early_stop_seq_per_s": round(len(qs) / t_fast, 2),
                         "ratio": round(t_slow / t_fast, 2)}
    note("extraction", out["extraction"])
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
