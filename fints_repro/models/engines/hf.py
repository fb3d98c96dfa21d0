"""``engine=hf``: transformers' ``generate`` in left-padded batches, with the per-row
hooks (steering vectors, adapters) entered around each batch: the reference engine."""

from __future__ import annotations

from typing import Iterator, Sequence

from fints_repro.models.engines.base import ENGINES, Engine
from fints_repro.models.generation import BatchContext, DecodingParams, generate_batches
from fints_repro.models.loading import LoadedModel


@ENGINES.register("hf")
class HFEngine(Engine):
    name = "hf"
    supports = frozenset({"per_row_steering", "per_row_adapters", "n_samples"})

    def generate(self, lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                 batch_size: int = 8, sort_by_length: bool = True,
                 skip: set[int] | frozenset[int] = frozenset(),
                 batch_context: BatchContext | None = None, num_return_sequences: int = 1,
                 cache_implementation: str | None = None, progress: bool = True,
                 desc: str = "generate") -> Iterator[tuple[list[int], list[str]]]:
        return generate_batches(lm, texts, params, batch_size=batch_size,
                                sort_by_length=sort_by_length, skip=skip,
                                batch_context=batch_context,
                                num_return_sequences=num_return_sequences,
                                cache_implementation=cache_implementation, progress=progress,
                                desc=desc)
