"""The engine interface and its registry (the package docstring says how they are used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional, Sequence

from fints_repro.config import EngineConfig
from fints_repro.models.generation import BatchContext, DecodingParams
from fints_repro.models.loading import LoadedModel
from fints_repro.registry import Registry

# What a request may need beyond plain generation of N candidates:
# per_row_steering: a vector added per row inside the model (steering plans' hooks);
# per_row_adapters: a different adapter per row (the LoRA backbone's users);
# n_samples: N sampled candidates per prompt (best-of-N).
CAPABILITIES = ("per_row_steering", "per_row_adapters", "n_samples")


@dataclass(frozen=True)
class RowAdapter:
    """One row's adapter as files an engine loads itself: PEFT's format in ``path``
    (``adapter_config.json`` + ``adapter_model.safetensors``); ``name`` is its identity
    (the content hash the generation cache keys carry), ``rank`` its LoRA rank."""

    name: str
    path: str
    rank: int


class Engine:
    """Base class: ``name`` and ``supports`` are declared by the subclass; ``generate``
    has the contract of ``models.generation.generate_batches`` (see there), plus
    ``adapters``: per text, the adapter its row runs with (None: the base model).

    An engine that ``runs_hooks`` generates inside the callers' ``batch_context`` (the
    steering hooks, the LoRA backbone's PEFT wrapper with every adapter loaded); any
    other gets no context, and loads each row's ``adapters`` itself. ``adapter_rank``:
    the largest LoRA rank of the adapters the run's rows bring (0: none), for an engine
    that reserves its adapter slots when its model is loaded."""

    name: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()
    runs_hooks: ClassVar[bool] = False

    def __init__(self, cfg: EngineConfig, adapter_rank: int = 0):
        self.cfg = cfg
        self.adapter_rank = adapter_rank

    @classmethod
    def check_available(cls) -> None:
        """At start-up: a ConfigError saying how to install what the engine runs on."""

    def cache_identity(self) -> list[Any]:
        """What of this engine decides its tokens: part of every generation cache key."""
        return [self.name]

    def generate(self, lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                 batch_size: int = 8, sort_by_length: bool = True,
                 skip: set[int] | frozenset[int] = frozenset(),
                 batch_context: BatchContext | None = None,
                 adapters: Optional[Sequence[Optional[RowAdapter]]] = None,
                 num_return_sequences: int = 1, cache_implementation: str | None = None,
                 progress: bool = True,
                 desc: str = "generate") -> Iterator[tuple[list[int], list[str]]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (its model, its KV cache)."""


ENGINES: Registry[type[Engine]] = Registry("generation engine", package="fints_repro.models.engines")
