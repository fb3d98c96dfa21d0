"""transformers' batched ``generate`` against vLLM's offline engine on the demo's workloads:
speed (samples/s, one run, same machine, the model loaded once per engine) and, for
greedy decoding, parity (the share of exact matches and, where they differ, the first
diverging token).

    python scripts/bench_engines.py [--exp demo] [--new-tokens 64 256] [--candidates 4]
                                    [--workloads rag,best_of_4] [--out results/bench-engines] [OVERRIDE ...]

Workloads (the demo's prompts, chat-rendered as the run renders them):
- ``zero_shot`` and ``rag``: the evaluated samples' prompts at the dataset's new tokens;
- ``pairs@T``: every pair-generator prompt of the demo (8 users x 12 items x 2 attempts)
  at T new tokens, for each T of ``--new-tokens``;
- ``best_of_N``: the RAG prompts, N sampled candidates each (transformers repeats each
  prompt N times in the batch; vLLM draws them from one prefill).
transformers decodes in batches of ``generation.batch_size`` (the demo's 8), sorted by
length, as the run does. Needs vLLM (``make install VLLM=1``); writes ``bench.json``,
``bench.md`` and a README into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def first_divergence(tok, a: str, b: str) -> int | None:
    """The index of the first generated token where ``a`` and ``b`` differ (None: equal)."""
    if a == b:
        return None
    x, y = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return i
    return min(len(x), len(y))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="demo")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/bench-engines"))
    ap.add_argument("--workloads", default=None,
                    help="comma-separated names to run (zero_shot, rag, pairs@T, best_of_N); default all")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides")
    args = ap.parse_args()

    import torch

    from fints_repro.backbones import build_backbone
    from fints_repro.config import EngineConfig
    from fints_repro.models.chat import render_chat
    from fints_repro.models.engines import ENGINES
    from fints_repro.models.engines.base import Engine
    from fints_repro.models.generation import DecodingParams
    from fints_repro.preferences import user_pairs
    from fints_repro.provenance import command_line, provenance
    from fints_repro.report import markdown, write_folder_readme
    from fints_repro.stages import open_run

    ctx = open_run([f"+exp={args.exp}", "logger=none", "progress=false", "engine=vllm",
                    *args.overrides])
    cfg, lm = ctx.cfg, ctx.model(None)
    tok = lm.tokenizer
    hf = ENGINES.get("hf")(EngineConfig())
    vllm = ENGINES.get("vllm")(cfg.engine)

    def prompts(backbone: str) -> list[str]:
        b = dataclasses.replace(cfg.backbone, name=backbone)
        built = build_backbone(b, ctx.task, ctx.retriever).build_prompts(ctx.samples)
        return [render_chat(tok, p.text, lm.system_prompt) for p in built]

    class Recorder(Engine):
        """Records the pair generator's prompts instead of generating."""
        name, supports = "recorder", frozenset({"n_samples"})
        texts: list[str] = []

        def generate(self, lm, texts, params, **kw):
            Recorder.texts = list(texts)
            yield list(range(len(texts))), [""] * len(texts)

    with tempfile.TemporaryDirectory() as scratch:
        from fints_repro.preferences.pairs import PairSource

        rec_lm = dataclasses.replace(lm, engine=Recorder(EngineConfig()))
        source = PairSource(dataset=cfg.dataset, task=ctx.task, cache_dir=Path(scratch),
                            seed=cfg.seed, generator=lambda: rec_lm, progress=False)
        user_pairs(cfg.steering.pairs, ctx.samples, source)
    pair_texts = Recorder.texts

    max_new = cfg.dataset.max_new_tokens
    workloads = [("zero_shot", prompts("zero_shot"), max_new, 1),
                 ("rag", prompts("rag"), max_new, 1),
                 *[(f"pairs@{t}", pair_texts, t, 1) for t in args.new_tokens],
                 (f"best_of_{args.candidates}", prompts("rag"), max_new, args.candidates)]
    if args.workloads:
        keep = args.workloads.split(",")
        workloads = [w for w in workloads if w[0] in keep]
    batch = cfg.generation.batch_size

    def run(engine, texts, params, n):
        t0 = time.perf_counter()
        out: dict[int, list[str]] = {}
        for idx, gens in engine.generate(lm, texts, params, batch_size=batch, progress=False,
                                         num_return_sequences=n):
            out.update({i: gens[j * n:(j + 1) * n] for j, i in enumerate(idx)})
        return time.perf_counter() - t0, [out[i] for i in range(len(texts))]

    t0 = time.perf_counter()
    vllm.llm(lm)  # the engine's start, timed apart from the workloads
    start_s = time.perf_counter() - t0
    rows, parity = [], []
    for name, texts, new_tokens, n in workloads:
        sample = n > 1
        params = DecodingParams(max_new_tokens=new_tokens, do_sample=sample,
                                temperature=0.7 if sample else 0.1, top_p=0.9,
                                seed=cfg.seed)
        t_hf, out_hf = run(hf, texts, params, n)
        t_vl, out_vl = run(vllm, texts, params, n)
        n_tok = [len(tok(g, add_special_tokens=False)["input_ids"]) for c in out_vl for g in c]
        rows.append({"workload": name, "prompts": len(texts), "candidates": n,
                     "new_tokens": new_tokens, "hf_s": round(t_hf, 1), "vllm_s": round(t_vl, 1),
                     "hf_samples_per_s": round(len(texts) / t_hf, 3),
                     "vllm_samples_per_s": round(len(texts) / t_vl, 3),
                     "ratio": round(t_hf / t_vl, 2),
                     "vllm_mean_tokens": round(sum(n_tok) / len(n_tok), 1)})
        print(json.dumps(rows[-1]), flush=True)
        if not sample:
            div = [first_divergence(tok, a[0], b[0]) for a, b in zip(out_hf, out_vl)]
            diff = [d for d in div if d is not None]
            parity.append({"workload": name, "prompts": len(texts), "exact": len(texts) - len(diff),
                           "exact_share": round((len(texts) - len(diff)) / len(texts), 4),
                           "first_divergence_tokens": sorted(diff),
                           "examples": [{"hf": a[0], "vllm": b[0], "at": d} for a, b, d
                                        in zip(out_hf, out_vl, div) if d is not None][:3]})
            print(json.dumps({k: v for k, v in parity[-1].items() if k != "examples"}), flush=True)

    out = {"model": lm.fingerprint, "device": str(lm.device), "threads": torch.get_num_threads(),
           "batch_size": batch, "vllm_start_s": round(start_s, 1), "speed": rows,
           "parity": parity, "provenance": provenance(str(lm.device))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
    text = (f"# transformers vs vLLM on the {args.exp} workloads\n\n"
            f"{lm.fingerprint} on {lm.device}, {out['threads']} torch threads, transformers in "
            f"batches of {batch}; vLLM's engine start {out['vllm_start_s']} s (not in the times)\n\n"
            "## Speed\n\n" + markdown(rows, list(rows[0]))
            + ("\n## Parity (greedy)\n\n" if parity else "")
            + ("" if not parity else markdown([{k: (", ".join(map(str, v)) if isinstance(v, list) else v)
                         for k, v in p.items() if k != "examples"} for p in parity],
                       ["workload", "prompts", "exact", "exact_share", "first_divergence_tokens"])))
    (args.out / "bench.md").write_text(text)
    write_folder_readme(args.out, command_line(), out["provenance"])
    print(text)
    vllm.close()


if __name__ == "__main__":
    main()
