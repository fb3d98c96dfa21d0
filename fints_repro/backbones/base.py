from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from fints_repro.config import BackboneConfig, DatasetConfig
from fints_repro.data.schema import Sample
from fints_repro.registry import Registry
from fints_repro.retrieval import Retriever


@dataclass
class Prompt:
    """The user-turn text for one sample, and which history items went into it."""

    text: str
    history_ids: list[str] = field(default_factory=list)


class Backbone(Protocol):
    name: str

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]: ...


BackboneFactory = Callable[[BackboneConfig, DatasetConfig, Callable[[], Retriever]], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def build_backbone(
    cfg: BackboneConfig, dataset: DatasetConfig, retriever: Callable[[], Retriever]
) -> Backbone:
    """``retriever`` is a thunk, so backbones that need none never load one."""
    return BACKBONES.get(cfg.name)(cfg, dataset, retriever)
