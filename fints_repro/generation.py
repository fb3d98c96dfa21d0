"""Batched generation: left-padded batches, greedy by default, with a per-batch hook for
steering (a context manager entered around each batch's ``generate``).

Batches are a fixed partition of the prompts (sorted by token length, longest first, so a
batch holds similar lengths and an out-of-memory shows at once). A batch's sampling seed
is derived from the run seed and the batch's first sample, so resuming a run regenerates
exactly the batches that are missing and gets the same text it would have got.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from fints_repro.models.cpu import packed_linears
from fints_repro.models.kv_cache import reserved_cache
from fints_repro.models.loading import LoadedModel

# Given the sample indices of a batch, returns the context to generate that batch in.
BatchContext = Callable[[list[int]], ContextManager]


@dataclass(frozen=True)
class DecodingParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.1
    top_p: float = 0.9
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kw: dict = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.min_new_tokens:
            kw["min_new_tokens"] = self.min_new_tokens
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence transformers' warnings about sampling params under greedy
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


def plan_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _batch_seed(seed: int, first: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first}".encode()).digest()[:4], "little")


@torch.inference_mode()
def generate_batches(
    lm: LoadedModel,
    texts: Sequence[str],
    params: DecodingParams,
    *,
    batch_size: int = 8,
    sort_by_length: bool = True,
    skip: set[int] | frozenset[int] = frozenset(),
    batch_context: BatchContext | None = None,
    packed_weights: bool | None = None,
    reserved_kv: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield ``(indices, generations)`` batch by batch for the texts not in ``skip``.

    ``texts`` are complete model inputs (chat template already applied).
    ``packed_weights`` (default: the model's ``cpu_packed_weights``): on the CPU, the
    decoding steps of full batches multiply with MKL-packed fp32 weights (``models/cpu.py``).
    ``reserved_kv``: the KV cache appends in place (``models/kv_cache.py``; bit-identical
    to transformers' default cache, which ``False`` uses).
    """
    encoded = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    batches = [b for b in plan_batches([len(e) for e in encoded], batch_size, sort_by_length)
               if any(i not in skip for i in b)]
    if not batches:
        return
    pack = lm.packed is not None if packed_weights is None else packed_weights
    rows = len(batches[0]) if pack else 0  # packed_linears packs only fp32 CPU weights
    bar = tqdm(total=sum(len(b) for b in batches), desc=desc, unit="sample",
               disable=not progress, leave=False)
    with packed_linears(lm.model, rows, keep=lm.packed):
        yield from _generate(lm, encoded, batches, params, skip, batch_context, reserved_kv, bar)
    bar.close()


def _generate(
    lm: LoadedModel, encoded: list[list[int]], batches: list[list[int]], params: DecodingParams,
    skip: set[int] | frozenset[int], batch_context: BatchContext | None, reserved_kv: bool,
    bar: tqdm,
) -> Iterator[tuple[list[int], list[str]]]:
    tok, model = lm.tokenizer, lm.model
    for batch in batches:
        enc = tok.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt",
                      padding=True).to(lm.device)
        ctx = batch_context(batch) if batch_context else contextlib.nullcontext()
        generator_seed = _batch_seed(params.seed, batch[0])
        with ctx, torch.random.fork_rng(devices=[] if lm.device.type == "cpu" else [lm.device]):
            torch.manual_seed(generator_seed)
            cache = reserved_cache(model, params.max_new_tokens) if reserved_kv else None
            out = model.generate(**enc, **params.generate_kwargs(), pad_token_id=tok.pad_token_id,
                                 **({"past_key_values": cache} if cache is not None else {}))
        gen = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        keep = [(i, g) for i, g in zip(batch, gen) if i not in skip]
        bar.update(len(keep))
        yield [i for i, _ in keep], [g for _, g in keep]
