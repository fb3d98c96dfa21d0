"""The throughput table: measured tokens per second of prefill and decoding, per model
size, device, dtype, batch and prompt length, each with its date and the benchmark that
measured it. Benchmarks append to it (``scripts/bench_gpu.py``,
``scripts/bench_throughput.py``); ``python -m fints_repro.plan`` reads it to turn a run's
token counts into time.

Standard library only: the GPU benchmark writes it on a machine without the project's
other dependencies.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_TABLE = Path(__file__).resolve().parent.parent / "results" / "throughput.json"


@dataclass(frozen=True)
class Throughput:
    model: str  # what was run (e.g. "smollm2_135m", "llama-3.1-8b config, random weights")
    params: int  # parameter count: what estimates for other models scale by
    device: str  # "cpu (2 cores, AMD EPYC)", "NVIDIA H100 80GB HBM3", ...
    device_type: str  # cpu | cuda | mps
    dtype: str  # float32 | bfloat16 | float16
    batch: int
    prompt_tokens: int
    prefill_tokens_per_s: float  # batch * prompt_tokens / the prompt pass's seconds
    decode_tokens_per_s: float  # batch * decoded tokens / the decoding steps' seconds
    date: str  # YYYY-MM-DD
    source: str  # the command that measured it


def read_table(path: str | Path = DEFAULT_TABLE) -> list[Throughput]:
    """The table's entries ([] when there is no table yet)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        return [Throughput(**r) for r in rows]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a throughput table ({e}); delete it or restore it from git") from e


def add_entries(entries: Iterable[Throughput], path: str | Path = DEFAULT_TABLE) -> None:
    """Append ``entries``, replacing any older one for the same model, device, dtype,
    batch and prompt length; written atomically, sorted."""
    path = Path(path)
    def key(t: Throughput) -> tuple:
        return (t.model, t.device, t.dtype, t.batch, t.prompt_tokens)
    table = {key(t): t for t in read_table(path)}
    table.update({key(t): t for t in entries})
    rows = [asdict(t) for t in sorted(table.values(), key=key)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def time_prefill_and_generate(model, input_ids, attention_mask, new_tokens: int, repeats: int,
                              sync: Callable[[], None] = lambda: None) -> tuple[float, float, object]:
    """(best seconds of the prompt pass, of ``generate`` with ``new_tokens`` new tokens for
    every row, its output), each the best of ``repeats`` after one untimed warm-up. The
    decoding steps take the difference."""
    import torch

    enc = {"input_ids": input_ids, "attention_mask": attention_mask}

    def prefill():
        with torch.inference_mode():
            return model(**enc, use_cache=True, logits_to_keep=1)

    def generate():
        with torch.inference_mode():
            return model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)

    return (*best_of(prefill, repeats, sync)[:1], *best_of(generate, repeats, sync))


def best_of(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
            warmup: Callable[[], object] | None = None) -> tuple[float, object]:
    """(best seconds of ``repeats`` runs after one untimed warm-up, the last result);
    ``warmup``: a shorter call that warms the same kernels (default ``fn`` itself)."""
    out = (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out
