"""The GPU benchmark: the paper's model size in bf16 on one CUDA device.

A model built from the Llama-3.1-8B config with random weights (nothing to download; the
prompts are random token ids, so no tokenizer is needed either) generates 32 new tokens
for batches of 1 / 8 / 32 prompts of 128 and 512 tokens:

- unsteered, then with per-row fine-grained steering (one attention and one MLP vector per
  row at the middle layer, the framework's hooks) and with one vector shared by every row;
- a mixed-adapter LoRA batch (one user's adapter per row, PEFT's ``adapter_names``) vs the
  same rows one adapter at a time.

It writes a table of tokens/s, the ratios and the peak GPU memory (``bench.md``,
``bench.json``) and appends the unsteered prefill and decoding speeds to the throughput
table that ``python -m fints_repro.plan`` reads. It needs only torch, transformers, peft
(and the repository's ``fints_repro/steering/hooks.py``), and runs in under 8 minutes on one
H100. ``--tiny`` runs the same code on a tiny config on the CPU (the test suite does).

    python scripts/bench_gpu.py [--out results/bench-gpu] [--repeats 2] [--tiny]

Each timing is the best of --repeats runs after one untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import fints_repro  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fints_repro.steering.hooks import steer  # noqa: E402
from fints_repro.throughput import (  # noqa: E402
    DEFAULT_TABLE,
    Throughput,
    add_entries,
    best_of,
    time_prefill_and_generate,
)

# meta-llama/Llama-3.1-8B-Instruct's config.json, the fields that decide the compute
LLAMA31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
FULL_GRID = dict(batches=(1, 8, 32), prompts=(128, 512), new_tokens=32, lora_batches=(8, 32),
                 lora_prompt=128, lora_rank=8)
TINY_GRID = dict(batches=(1, 4), prompts=(8, 16), new_tokens=4, lora_batches=(4,),
                 lora_prompt=8, lora_rank=4)


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Clock:
    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best(self, fn, repeats: int | None = None, warmup=None) -> tuple[float, object]:
        return best_of(fn, repeats or self.repeats, self.sync, warmup)

    def peak_reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)


def build_model(config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # every row decodes all its new tokens
    return model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench-gpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (the test)")
    ap.add_argument("--throughput-table", default=None,
                    help=f"where to append the measured speeds (default {DEFAULT_TABLE}; "
                         "--tiny: <out>/throughput.json)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.tiny:
        device, config, grid, dtype = torch.device("cpu"), TINY, TINY_GRID, torch.bfloat16
        name = "tiny llama config, random weights"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA device (or --tiny, on the CPU)")
        device, config, grid, dtype = torch.device("cuda"), LLAMA31_8B, FULL_GRID, torch.bfloat16
        name = "llama-3.1-8b config, random weights"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    t_start = time.time()
    clock = Clock(device, args.repeats)
    model = build_model(config, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    note(f"{name}: {n_params / 1e9:.2f}B parameters in {dtype} on {card}, "
         f"built in {time.time() - t_start:.1f}s")
    H, layer = config["hidden_size"], config["num_hidden_layers"] // 2
    new = grid["new_tokens"]
    gen = torch.Generator().manual_seed(0)

    def prompts(batch: int, length: int) -> dict:
        low = min(1000, config["vocab_size"] // 2)  # above the special tokens
        ids = torch.randint(low, config["vocab_size"], (batch, length), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    def generate(model_, enc, **kw):
        with torch.inference_mode():
            return model_.generate(**enc, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, **kw)

    rows: list[dict] = []
    speeds: list[Throughput] = []
    for length in grid["prompts"]:
        for batch in grid["batches"]:
            enc = prompts(batch, length)
            per_row = {(layer, "attn"): 0.5 * torch.randn(batch, H, generator=gen),
                       (layer, "mlp"): 0.5 * torch.randn(batch, H, generator=gen)}
            shared = {k: v[0] for k, v in per_row.items()}

            clock.peak_reset()
            t_prefill, t_plain, plain = time_prefill_and_generate(
                model, enc["input_ids"], enc["attention_mask"], new, clock.repeats, clock.sync)
            peak_plain = clock.peak_gib()

            def steered(vectors):
                with steer(model, vectors):
                    return generate(model, enc)

            clock.peak_reset()
            t_rows, by_rows = clock.best(lambda: steered(per_row))
            peak_rows = clock.peak_gib()
            t_shared, by_shared = clock.best(lambda: steered(shared))
            # per-row vectors that are all the shared one decode the shared one's tokens
            same = {k: v[None].expand(batch, -1).clone() for k, v in shared.items()}
            assert torch.equal(steered(same), by_shared), "per-row == shared vectors differ"
            assert plain.shape == (batch, length + new)
            decode_s = t_plain - t_prefill  # the decoding steps (noise can hide them on a tiny model)
            row = dict(prompt_tokens=length, batch=batch, new_tokens=new,
                       prefill_tokens_per_s=round(batch * length / t_prefill, 1),
                       decode_tokens_per_s=round(batch * (new - 1) / decode_s, 1) if decode_s > 0 else None,
                       unsteered_tokens_per_s=round(batch * new / t_plain, 1),
                       per_row_tokens_per_s=round(batch * new / t_rows, 1),
                       shared_tokens_per_s=round(batch * new / t_shared, 1),
                       per_row_vs_unsteered=round(t_plain / t_rows, 3),
                       per_row_vs_shared=round(t_shared / t_rows, 3),
                       peak_gib_unsteered=peak_plain, peak_gib_per_row=peak_rows)
            rows.append(row)
            speeds.append(Throughput(
                model=name, params=n_params, device=card, device_type=device.type,
                dtype=str(dtype).removeprefix("torch."), batch=batch, prompt_tokens=length,
                prefill_tokens_per_s=row["prefill_tokens_per_s"],
                decode_tokens_per_s=row["decode_tokens_per_s"], date=time.strftime("%Y-%m-%d"),
                source="scripts/bench_gpu.py" + (" --tiny" if args.tiny else "")))
            note(json.dumps(row))
    speeds = [s for s in speeds if s.decode_tokens_per_s is not None]

    lora_rows = bench_lora(model, grid, prompts, generate, clock)
    result = dict(model=name, params=n_params, device=card, dtype=str(dtype), layer=layer,
                  date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                  seconds_total=round(time.time() - t_start, 1), generation=rows, lora=lora_rows)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(result))
    table = args.throughput_table or (out / "throughput.json" if args.tiny else DEFAULT_TABLE)
    add_entries(speeds, table)
    note(f"done in {result['seconds_total']}s: {out / 'bench.md'}; speeds added to {table}")
    return result


def bench_lora(model, grid: dict, prompts, generate, clock: Clock) -> list[dict]:
    """A batch whose rows each use their own user's adapter (one ``generate`` call, PEFT's
    ``adapter_names``) vs the same rows one adapter (one call) at a time."""
    from peft import LoraConfig, get_peft_model

    n = max(grid["lora_batches"])
    spec = LoraConfig(r=grid["lora_rank"], lora_alpha=2 * grid["lora_rank"],
                      target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, spec, adapter_name="u0")
    for i in range(1, n):
        peft_model.add_adapter(f"u{i}", spec)
    peft_model.eval()
    rows = []
    try:
        for batch in grid["lora_batches"]:
            enc = prompts(batch, grid["lora_prompt"])
            names = [f"u{i}" for i in range(batch)]
            clock.peak_reset()
            t_mixed, mixed = clock.best(lambda: generate(peft_model, enc, adapter_names=names))
            peak = clock.peak_gib()

            def one(i: int):
                return generate(peft_model, {k: v[i:i + 1] for k, v in enc.items()},
                                adapter_names=[names[i]])

            # B calls in a row: long enough to time once, after one call as the warm-up
            t_single, single = clock.best(lambda: torch.cat([one(i) for i in range(batch)]),
                                          repeats=1, warmup=lambda: one(0))
            new = mixed.shape[1] - enc["input_ids"].shape[1]
            rows.append(dict(batch=batch, prompt_tokens=grid["lora_prompt"], new_tokens=new,
                             adapters=batch, rank=grid["lora_rank"],
                             mixed_tokens_per_s=round(batch * new / t_mixed, 1),
                             one_at_a_time_tokens_per_s=round(batch * new / t_single, 1),
                             mixed_vs_one_at_a_time=round(t_single / t_mixed, 3),
                             equal_tokens=bool(torch.equal(mixed, single)), peak_gib_mixed=peak))
            note(json.dumps(rows[-1]))
    finally:
        peft_model.unload()  # the base model as found
    return rows


def markdown(r: dict) -> str:
    lines = [f"# GPU benchmark: {r['model']} ({r['params'] / 1e9:.2f}B), {r['dtype']}",
             "", f"{r['device']}, torch {r['torch']}, {r['date']}; steering at layer "
             f"{r['layer']} (attention and MLP outputs); {r['seconds_total']} s in all.", "",
             "| prompt | batch | prefill tok/s | decode tok/s | unsteered tok/s | per-row tok/s "
             "| shared tok/s | per-row / unsteered | per-row / shared | peak GiB (unsteered, per-row) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g in r["generation"]:
        lines.append(f"| {g['prompt_tokens']} | {g['batch']} | {g['prefill_tokens_per_s']} | "
                     f"{g['decode_tokens_per_s']} | {g['unsteered_tokens_per_s']} | "
                     f"{g['per_row_tokens_per_s']} | {g['shared_tokens_per_s']} | "
                     f"{g['per_row_vs_unsteered']} | {g['per_row_vs_shared']} | "
                     f"{g['peak_gib_unsteered']}, {g['peak_gib_per_row']} |")
    lines += ["", "Ratios are of speeds (per-row / unsteered 0.95: per-row steering runs at 95% of "
              "the unsteered speed).", "",
              "| LoRA batch (one adapter per row) | rank | mixed tok/s | one adapter at a time tok/s "
              "| mixed / one at a time | same tokens | peak GiB |", "|---|---|---|---|---|---|---|"]
    for x in r["lora"]:
        lines.append(f"| {x['batch']} x {x['prompt_tokens']} tokens | {x['rank']} | "
                     f"{x['mixed_tokens_per_s']} | {x['one_at_a_time_tokens_per_s']} | "
                     f"{x['mixed_vs_one_at_a_time']} | {x['equal_tokens']} | {x['peak_gib_mixed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
