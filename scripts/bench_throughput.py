"""Prefill and decoding speed of the run's model on this machine, into the throughput
table that ``python -m fints_repro.plan`` estimates times from.

    python scripts/bench_throughput.py [overrides of run, e.g. +exp=demo model.dtype=bfloat16]
        [--batches 1,8] [--prompts 128,512] [--new 16] [--repeats 2] [--table PATH]

Random token ids as prompts (the speed does not depend on the text), every row decoding
all ``--new`` tokens; each timing the best of --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--table", default=None)
    args, overrides = ap.parse_known_args(argv)

    import torch

    from fints_repro.compose import compose_run
    from fints_repro.models.loading import load_model
    from fints_repro.throughput import DEFAULT_TABLE, Throughput, add_entries, time_prefill_and_generate

    cfg = compose_run(overrides)
    lm = load_model(cfg.model, cfg.cache_dir)
    model, device = lm.model, lm.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    params = sum(p.numel() for p in model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    model.generation_config.eos_token_id = None
    entries = []
    for length in map(int, args.prompts.split(",")):
        for batch in map(int, args.batches.split(",")):
            ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
            t_prefill, t_gen, _ = time_prefill_and_generate(model, ids, torch.ones_like(ids), args.new,
                                                            args.repeats, sync)
            decode = t_gen - t_prefill
            if decode <= 0:  # noise hid the decoding steps: no figure rather than a wrong one
                print(f"batch {batch} x {length}: no decoding time left after the prompt pass",
                      file=sys.stderr)
                continue
            entry = Throughput(
                model=cfg.model.name, params=params, device=card, device_type=device.type,
                dtype=str(model.dtype).removeprefix("torch."), batch=batch, prompt_tokens=length,
                prefill_tokens_per_s=round(batch * length / t_prefill, 1),
                decode_tokens_per_s=round(batch * (args.new - 1) / decode, 1),
                date=time.strftime("%Y-%m-%d"),
                source="scripts/bench_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))
            print(entry, file=sys.stderr, flush=True)
            entries.append(entry)
    add_entries(entries, args.table or DEFAULT_TABLE)
    return entries


if __name__ == "__main__":
    main()
