"""Prompting backbones: zero-shot (the task input alone) and RAG (the user's top-k history
items, retrieved for the input, rendered by the dataset's templates before the input)."""

from __future__ import annotations

from typing import Callable, Sequence

from fints_repro.backbones.base import BACKBONES, Prompt
from fints_repro.config import BackboneConfig, DatasetConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.retrieval import Retriever


def retrieval_query(sample: Sample, dataset: DatasetConfig) -> str:
    """The input without the task's instruction prefix (the article, the paper title ...)."""
    prefix = dataset.query_strip_prefix
    if prefix and sample.input.startswith(prefix):
        return sample.input[len(prefix):].strip()
    return sample.input


def history_document(item: HistoryItem) -> str:
    """What retrieval matches a query against: the item's output and input together."""
    return f"{item.output} {item.input}"


def truncate_words(text: str, n: int | None) -> str:
    if n is None:
        return text
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


@BACKBONES.register("zero_shot")
class ZeroShot:
    name = "zero_shot"

    def __init__(self, cfg: BackboneConfig, dataset: DatasetConfig,
                 retriever: Callable[[], Retriever]):
        self.dataset = dataset

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        return [Prompt(s.input) for s in samples]


@BACKBONES.register("rag")
class RAG:
    name = "rag"

    def __init__(self, cfg: BackboneConfig, dataset: DatasetConfig,
                 retriever: Callable[[], Retriever]):
        self.dataset = dataset
        self.k = cfg.k if cfg.k is not None else dataset.rag_k
        self._retriever = retriever

    def render(self, sample: Sample, items: Sequence[HistoryItem]) -> str:
        d = self.dataset
        if not items:  # empty history: the prompt is the zero-shot one
            return sample.input
        # `{i}` in the template: the item's 0-based position (the authors' "Historical sample i")
        shown = [
            d.history_template.format(
                i=i, input=truncate_words(h.input, d.history_max_words), output=h.output
            )
            for i, h in enumerate(items)
        ]
        return d.rag_prompt_template.format(history=d.history_separator.join(shown),
                                            input=sample.input)

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        with_history = [i for i, s in enumerate(samples) if s.history]
        rankings: dict[int, list[tuple[int, float]]] = {}
        if with_history and self.k > 0:
            ranked = self._retriever().rank_many(
                [retrieval_query(samples[i], self.dataset) for i in with_history],
                [[history_document(h) for h in samples[i].history] for i in with_history],
                self.k,
            )
            rankings = dict(zip(with_history, ranked))
        prompts = []
        for i, s in enumerate(samples):
            items = [s.history[j] for j, _ in rankings.get(i, [])]
            prompts.append(Prompt(self.render(s, items), [h.id for h in items]))
        return prompts
