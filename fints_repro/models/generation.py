"""Batched generation: left-padded batches, greedy by default, with a per-batch hook for
steering (a context manager entered around each batch's ``generate``), optionally N
candidates per prompt.

Batches are a fixed partition of the prompts (sorted by token length, longest first, so a
batch holds similar lengths and an out-of-memory shows at once). A batch's sampling seed
is derived from the run seed and the batch's first sample, so resuming a run regenerates
exactly the batches that are missing and gets the same text it would have got.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from fints_repro.models.loading import LoadedModel

log = logging.getLogger(__name__)

# Given the sample index of each row that a batch's generate call runs, returns the
# context to run that call in (see generate_batches: with N sampled candidates per
# prompt, each index comes N times in a row). What the context yields, if a dict, is
# passed to ``generate`` as extra keyword arguments (e.g. PEFT's per-row
# ``adapter_names``).
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


def resolve_decoding(do_sample: bool | None, temperature: float | None, top_p: float | None,
                     model, *, max_new_tokens: int, seed: int) -> DecodingParams:
    """Decoding settings with each null taken from the checkpoint's own generation config
    (``model.generation_config``: what ``generate`` does when a call sets nothing), and
    transformers' defaults where the checkpoint sets nothing either (greedy, T = 1,
    top-p = 1)."""
    ck = getattr(model, "generation_config", None)

    def pick(value, name: str, default):
        if value is not None:
            return value
        got = getattr(ck, name, None)
        return default if got is None else got

    return DecodingParams(max_new_tokens=max_new_tokens, do_sample=bool(pick(do_sample, "do_sample", False)),
                          temperature=float(pick(temperature, "temperature", 1.0)),
                          top_p=float(pick(top_p, "top_p", 1.0)), seed=seed)


def plan_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def derived_seed(seed: int, index: int) -> int:
    """A 32-bit seed for the rows starting at ``index`` (a batch, or one prompt), from the
    run seed: the same rows draw the same text whatever else is generated."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


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
    num_return_sequences: int = 1,
    cache_implementation: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> Iterator[tuple[list[int], list[str]]]:
    """Yield ``(indices, generations)`` batch by batch for the texts not in ``skip``.

    ``texts`` are complete model inputs (chat template already applied).
    ``generations`` is flat and row-major: ``num_return_sequences`` (N) candidates per
    index, those of ``indices[i]`` at ``i*N .. i*N+N-1`` (for N = 1, one text per index).
    Under sampling the N candidates are drawn in one ``generate`` call, which repeats each
    prompt N times in a row (``repeat_interleave``); under greedy decoding they would all
    be the same, so the batch is decoded once and its texts repeated.

    ``batch_context(rows)`` is entered around each batch's ``generate`` call. ``rows``
    holds the sample index of each row that call runs, in order: the batch's indices, each
    repeated N times in a row when sampling N > 1 candidates (once otherwise). A context
    that indexes per-sample tensors with it (``vectors[rows]``, as
    ``SteeringPlan.batch_context`` does) so gets one vector per row of the expanded batch.

    ``cache_implementation``: transformers' KV cache for ``generate`` (None = its
    default, the dynamic cache; or one of its names, e.g. ``"static"``).
    """
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences}; expected >= 1")
    encoded = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    batches = [b for b in plan_batches([len(e) for e in encoded], batch_size, sort_by_length)
               if any(i not in skip for i in b)]
    if not batches:
        return
    expand = num_return_sequences if params.do_sample else 1  # rows per prompt in generate
    bar = tqdm(total=sum(len(b) for b in batches), desc=desc, unit="sample",
               disable=not progress, leave=False)
    yield from _generate(lm, encoded, batches, params, skip, batch_context,
                         num_return_sequences, expand, cache_implementation, bar)
    bar.close()


def _generate(
    lm: LoadedModel, encoded: list[list[int]], batches: list[list[int]], params: DecodingParams,
    skip: set[int] | frozenset[int], batch_context: BatchContext | None, n: int, expand: int,
    cache_implementation: str | None, bar: tqdm,
) -> Iterator[tuple[list[int], list[str]]]:
    tok, model = lm.tokenizer, lm.model
    kw = params.generate_kwargs()
    if expand > 1:
        kw["num_return_sequences"] = expand
    if cache_implementation is not None:
        kw["cache_implementation"] = cache_implementation
    for batch in batches:
        enc = tok.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt",
                      padding=True).to(lm.device)
        rows = [i for i in batch for _ in range(expand)]
        ctx = batch_context(rows) if batch_context else contextlib.nullcontext()
        generator_seed = derived_seed(params.seed, batch[0])
        with ctx as extra, torch.random.fork_rng(devices=[] if lm.device.type == "cpu" else [lm.device]):
            torch.manual_seed(generator_seed)
            out = model.generate(**enc, **kw, **(extra or {}), pad_token_id=tok.pad_token_id)
        gen = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if expand < n:  # greedy: every candidate is the one decoded
            gen = [g for g in gen for _ in range(n)]
        keep = [j for j, i in enumerate(batch) if i not in skip]
        bar.update(len(keep))
        yield [batch[j] for j in keep], [g for j in keep for g in gen[j * n:(j + 1) * n]]
