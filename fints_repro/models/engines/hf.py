"""``engine=hf``: transformers' ``generate`` in left-padded batches, with the per-row
hooks (steering vectors, adapters) entered around each batch: the reference engine."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from fints_repro.models.engines.base import ENGINES, Engine, RowAdapter
from fints_repro.models.generation import DecodingParams, generate_batches
from fints_repro.models.loading import LoadedModel


@ENGINES.register("hf")
class HFEngine(Engine):
    name = "hf"
    supports = frozenset({"per_row_steering", "per_row_adapters", "n_samples"})
    runs_hooks = True

    def generate(self, lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                 adapters: Optional[Sequence[Optional[RowAdapter]]] = None,
                 **options: Any) -> Iterator[tuple[list[int], list[str]]]:
        # Each row's adapter runs through the batch context (the backbone's PEFT wrapper,
        # every adapter loaded): ``adapters`` is for engines that load them from files.
        # The other options of Engine.generate are generate_batches' own.
        return generate_batches(lm, texts, params, **options)
