"""Backbones: the personalization method that steering plugs into.

A backbone has a lifecycle, run by the pipeline in this order:

1. ``fit(lm, samples, ctx)``: per-user preparation (training a user's adapter or reward
   model), cached by content hash by the backbone itself. Prompting backbones fit
   nothing. ``ctx`` (``FitContext``) is what the run lends: the cache folder, the seed,
   how the method makes contrastive pairs and from what (for a backbone that trains on
   them), the training-split items, and other models by option name.
2. ``build_prompts(samples)``: the user-turn text of each sample and the history it used.
3. ``model(lm)``: the model that generation and extraction run on (default ``lm``; LoRA:
   the PEFT wrapper holding every user's adapter). ``decoding(params)``: the decoding
   parameters (default the run's; best-of-N samples its candidates).
4. ``model_context(lm, rows)``: a context manager entered around the generation of a
   group of rows; what it yields, if a dict, goes to ``generate`` (LoRA: each row's
   ``adapter_names``). ``user_context(lm, users)`` is the same for a list of users (the
   extraction of steering vectors with each pair's user's adapter), and
   ``user_identity(user)`` what of the user's, besides the input, decides the model's
   activations (an adapter's hash; part of the vector cache key). Prompting: nothing.
5. ``n_candidates``: how many return sequences each row gets from one ``generate``.
6. ``select(samples, candidates)``: which candidate becomes the prediction (index per
   sample, and per-sample information for ``predictions.jsonl``). Default: the first.
7. ``metrics()``: what the backbone reports into ``metrics.json`` (training seconds per
   user, ...); ``close(lm)``: undo what ``fit`` did to the shared model (always called).

``row_identity(i)`` is what, besides the prompt, decides row i's output (an adapter's
content hash, ...): it is part of the generation cache key, so no backbone can reuse
another's generations. Prompting backbones return "" (their prompt is all of it: RAG rows
of a user with no history share zero-shot's generations, rightly).

A generation engine that does not run the callers' contexts (``engine=vllm``) loads each
row's adapter itself: ``row_adapter(i)`` names its files (``models.engines.RowAdapter``;
None: the base model), and ``adapter_rank(cfg)``, known from the config before anything
is trained, the rank the engine reserves its adapter slots with (0: no adapters).

Adding a backbone is one module in this package (the class registered in ``BACKBONES``
with its settings) and one yaml in ``conf/backbone/`` (docs/extending.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional, Sequence

from fints_repro.config import BackboneConfig, PairsConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.preferences import PairSource
from fints_repro.registry import Registry
from fints_repro.retrieval import Retriever

if TYPE_CHECKING:
    from fints_repro.models.engines import RowAdapter
    from fints_repro.models.generation import DecodingParams
    from fints_repro.models.loading import LoadedModel
    from fints_repro.tasks import Task


@dataclass
class Prompt:
    """The user-turn text for one sample, and which history items went into it."""

    text: str
    history_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FitContext:
    """What ``Backbone.fit`` may use besides the model and the samples. The pipeline builds
    one per method (``stages.RunContext.fit_context``); tests build them directly."""

    cache_dir: Path
    seed: int = 0
    progress: bool = False
    # How the method makes contrastive pairs (its steering.pairs) and what from: the
    # backbones that train on pairs (reward_model) make them through preferences.user_pairs.
    pairs: PairsConfig = field(default_factory=PairsConfig)
    pair_source: Optional[PairSource] = None
    # Per user, the items of the training split (backbone.lora.train_on=train_samples).
    train_items: Callable[[], dict[str, list[HistoryItem]]] = dict
    # A model option by name (backbone.reward_model.encoder), loaded once per run.
    model: Optional[Callable[[str], "LoadedModel"]] = None
    # generation.batch_size and generation.overlength, for a backbone's own generations
    # (the judge's personas and verdicts).
    batch_size: int = 8
    overlength: str = "error"

    def model_option(self, name: str) -> "LoadedModel":
        if self.model is None:
            raise RuntimeError(f"model option {name!r} asked for, and this fit context loads none")
        return self.model(name)


class Backbone:
    """Base class with the lifecycle's defaults (see the module docstring)."""

    name: str = ""
    n_candidates: int = 1
    # What its rows need of the generation engine beyond plain decoding (names in
    # models.engines.CAPABILITIES), e.g. per_row_adapters: a different adapter per row.
    needs: frozenset[str] = frozenset()

    def __init__(self, cfg: BackboneConfig, task: "Task", retriever: Callable[[], Retriever]):
        self.cfg, self.task, self._retriever = cfg, task, retriever

    def fit(self, lm: "LoadedModel", samples: Sequence[Sample], ctx: FitContext) -> None:
        """Per-user preparation before prompts are built (cached by the backbone)."""

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        raise NotImplementedError

    def model(self, lm: "LoadedModel") -> "LoadedModel":
        return lm

    def decoding(self, params: "DecodingParams") -> "DecodingParams":
        return params

    def model_context(self, lm: "LoadedModel", rows: list[int]) -> ContextManager:
        return contextlib.nullcontext()

    def user_context(self, lm: "LoadedModel", users: list[str]) -> ContextManager:
        return contextlib.nullcontext()

    def user_identity(self, user: str) -> str:
        return ""

    def row_identity(self, i: int) -> str:
        return ""

    def row_adapter(self, i: int) -> Optional["RowAdapter"]:
        return None

    @classmethod
    def adapter_rank(cls, cfg: BackboneConfig) -> int:
        return 0

    def metrics(self) -> dict[str, Any]:
        return {}

    def close(self, lm: "LoadedModel") -> None:
        """Undo what ``fit`` changed in the shared model (called after the method, also
        after an error)."""

    def select(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]
               ) -> tuple[list[int], list[dict[str, Any]]]:
        return [0] * len(candidates), [{} for _ in candidates]


BackboneFactory = Callable[[BackboneConfig, "Task", Callable[[], Retriever]], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone", package="fints_repro.backbones")


def backbone_schema() -> type:
    """``BackboneConfig`` with one node per registered backbone that has settings
    (``backbone.lora``, ``backbone.reward_model``): the type Hydra composes ``backbone`` into."""
    return BACKBONES.schema(BackboneConfig, __name__)


def __getattr__(name: str) -> Any:
    if name == "BackboneSchema":
        return backbone_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_backbone(cfg: BackboneConfig, task: "Task", retriever: Callable[[], Retriever]) -> Backbone:
    """``retriever`` is a thunk, so backbones that need none never load one."""
    return BACKBONES.get(cfg.name, "backbone.name")(cfg, task, retriever)
