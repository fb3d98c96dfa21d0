"""The engine interface and its registry (the package docstring says how they are used)."""

from __future__ import annotations

from typing import Any, ClassVar, Iterator, Sequence

from fints_repro.config import EngineConfig
from fints_repro.models.generation import BatchContext, DecodingParams
from fints_repro.models.loading import LoadedModel
from fints_repro.registry import Registry

# What a request may need beyond plain generation of N candidates:
# per_row_steering: a vector added per row inside the model (steering plans' hooks);
# per_row_adapters: a different adapter per row (the LoRA backbone's users);
# n_samples: N sampled candidates per prompt (best-of-N).
CAPABILITIES = ("per_row_steering", "per_row_adapters", "n_samples")


class Engine:
    """Base class: ``name`` and ``supports`` are declared by the subclass; ``generate``
    has the contract of ``models.generation.generate_batches`` (see there)."""

    name: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    @classmethod
    def check_available(cls) -> None:
        """At start-up: a ConfigError saying how to install what the engine runs on."""

    def cache_identity(self) -> list[Any]:
        """What of this engine decides its tokens: part of every generation cache key."""
        return [self.name]

    def generate(self, lm: LoadedModel, texts: Sequence[str], params: DecodingParams, *,
                 batch_size: int = 8, sort_by_length: bool = True,
                 skip: set[int] | frozenset[int] = frozenset(),
                 batch_context: BatchContext | None = None, num_return_sequences: int = 1,
                 cache_implementation: str | None = None, progress: bool = True,
                 desc: str = "generate") -> Iterator[tuple[list[int], list[str]]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (its model, its KV cache)."""


ENGINES: Registry[type[Engine]] = Registry("generation engine", package="fints_repro.models.engines")
