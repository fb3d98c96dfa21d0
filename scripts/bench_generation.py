"""Generation throughput of the default model on the demo prompts: batch B vs batch 1.

    python scripts/bench_generation.py [--n 16] [--batch 8] [--backbone rag] [--repeats 2]
                                       [--cache-implementation static]

Prints samples/s and generated tokens/s for each batch size and their ratio. Same prompts,
same greedy decoding, model loaded once; one untimed warm-up batch first, then the best of
--repeats passes per batch size (this VM's speed drifts by several percent between passes).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="number of demo prompts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backbone", default="rag", choices=["zero_shot", "rag"])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-implementation", default=None,
                    help="transformers' KV cache (default: its dynamic cache), e.g. static")
    args = ap.parse_args()

    from fints_repro.backbones import build_backbone
    from fints_repro.compose import compose_run
    from fints_repro.data.load import load_samples
    from fints_repro.models.generation import DecodingParams, generate_batches
    from fints_repro.models.chat import render_chat
    from fints_repro.models.loading import load_model
    from fints_repro.retrieval import build_retriever
    from fints_repro.tasks import build_task

    cfg = compose_run([
        "+exp=demo", f"backbone={args.backbone}", f"model={args.model}", "logger=none"])
    samples = load_samples(cfg.dataset, seed=cfg.seed)[: args.n]
    lm = load_model(cfg.model, cfg.cache_dir)
    task = build_task(cfg.dataset, cfg.generation, cfg.eval)
    prompts = build_backbone(cfg.backbone, task,
                             lambda: build_retriever(cfg.retriever)).build_prompts(samples)
    texts = [render_chat(lm.tokenizer, p.text, lm.system_prompt) for p in prompts]
    params = DecodingParams(max_new_tokens=cfg.dataset.max_new_tokens)

    def run(batch_size: int) -> dict:
        dt = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n_tokens = 0
            for _, gens in generate_batches(lm, texts, params, batch_size=batch_size,
                                            progress=False,
                                            cache_implementation=args.cache_implementation):
                n_tokens += sum(len(lm.tokenizer(g, add_special_tokens=False)["input_ids"])
                                for g in gens)
            dt = min(dt, time.perf_counter() - t0)
        return {"batch": batch_size, "seconds": round(dt, 2),
                "samples_per_s": round(len(texts) / dt, 3), "tokens_per_s": round(n_tokens / dt, 1)}

    list(generate_batches(lm, texts[: args.batch], params, batch_size=args.batch, progress=False,
                          cache_implementation=args.cache_implementation))
    one, many = run(1), run(args.batch)
    print(json.dumps({"model": lm.fingerprint, "device": str(lm.device),
                      "threads": torch.get_num_threads(), "n_prompts": len(texts),
                      "backbone": args.backbone, "cache_implementation": args.cache_implementation,
                      "batch_1": one, f"batch_{args.batch}": many,
                      "samples_per_s_ratio": round(many["samples_per_s"] / one["samples_per_s"], 2)},
                     indent=1))


if __name__ == "__main__":
    main()
