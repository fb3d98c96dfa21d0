"""Backbones: the personalization method that steering plugs into.

A backbone has a lifecycle, run by the pipeline in this order:

1. ``fit(lm, samples, resources)``: per-user preparation (e.g. training a user's adapter),
   cached by content hash by the backbone itself. Prompting backbones fit nothing.
2. ``build_prompts(samples)``: the user-turn text of each sample and the history it used.
3. ``model_context(lm, rows)``: a context manager entered around the generation of a
   group of rows (e.g. activating each row's adapter). Prompting: nothing.
4. ``n_candidates``: how many return sequences each row gets from one ``generate``.
5. ``select(samples, candidates)``: which candidate becomes the prediction (index per
   sample, and per-sample information for ``predictions.jsonl``). Default: the first.

``row_identity(i)`` is what, besides the prompt, decides row i's output (an adapter's
content hash, ...): it is part of the generation cache key, so no backbone can reuse
another's generations. Prompting backbones return "" (their prompt is all of it: RAG rows
of a user with no history share zero-shot's generations, rightly).

Adding a backbone is one class registered in ``BACKBONES`` and one yaml in
``conf/backbone/``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from fints_repro.config import BackboneConfig
from fints_repro.data.schema import Sample
from fints_repro.registry import Registry
from fints_repro.retrieval import Retriever

if TYPE_CHECKING:
    from fints_repro.models.loading import LoadedModel
    from fints_repro.tasks import Task


@dataclass
class Prompt:
    """The user-turn text for one sample, and which history items went into it."""

    text: str
    history_ids: list[str] = field(default_factory=list)


class Backbone:
    """Base class with the lifecycle's defaults (see the module docstring)."""

    name: str = ""
    n_candidates: int = 1

    def __init__(self, cfg: BackboneConfig, task: "Task", retriever: Callable[[], Retriever]):
        self.cfg, self.task, self._retriever = cfg, task, retriever

    def fit(self, lm: "LoadedModel", samples: Sequence[Sample], resources: Any) -> None:
        """Per-user preparation before prompts are built (cached by the backbone)."""

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        raise NotImplementedError

    def model_context(self, lm: "LoadedModel", rows: list[int]) -> ContextManager:
        return contextlib.nullcontext()

    def row_identity(self, i: int) -> str:
        return ""

    def select(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]
               ) -> tuple[list[int], list[dict[str, Any]]]:
        return [0] * len(candidates), [{} for _ in candidates]


BackboneFactory = Callable[[BackboneConfig, "Task", Callable[[], Retriever]], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def build_backbone(cfg: BackboneConfig, task: "Task", retriever: Callable[[], Retriever]) -> Backbone:
    """``retriever`` is a thunk, so backbones that need none never load one."""
    return BACKBONES.get(cfg.name, "backbone.name")(cfg, task, retriever)
