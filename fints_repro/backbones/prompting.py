"""Prompting backbones: zero-shot (the task input alone) and RAG (the user's top-k history
items, retrieved for the input, rendered by the dataset's templates before the input)."""

from __future__ import annotations

from typing import Sequence

from fints_repro.backbones.base import BACKBONES, Backbone, Prompt
from fints_repro.config import DatasetConfig
from fints_repro.data.schema import HistoryItem, Sample


def truncate_words(text: str, n: int | None) -> str:
    if n is None:
        return text
    words = text.split()
    return text if len(words) <= n else " ".join(words[:n]) + " ..."


def render_with_history(d: DatasetConfig, text: str, items: Sequence[HistoryItem]) -> str:
    """``text`` after ``items`` by the dataset's RAG templates (``{i}``: the item's 0-based
    position, the authors' "Historical sample i"); no items: ``text`` alone."""
    if not items:
        return text
    shown = [d.history_template.format(i=i, input=truncate_words(h.input, d.history_max_words),
                                       output=h.output)
             for i, h in enumerate(items)]
    return d.rag_prompt_template.format(history=d.history_separator.join(shown), input=text)


def zero_shot_prompt(d: DatasetConfig, text: str) -> str:
    """``text`` in ``dataset.zero_shot_template``; an input that starts with
    ``dataset.zero_shot_keep_prefix`` keeps its own opening (the template's text before
    ``{input}`` is left out)."""
    template = d.zero_shot_template
    if d.zero_shot_keep_prefix and text.startswith(d.zero_shot_keep_prefix):
        template = "{input}" + template.split("{input}", 1)[1]
    return template.format(input=text)


@BACKBONES.register("zero_shot")
class ZeroShot(Backbone):
    name = "zero_shot"

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        return [Prompt(zero_shot_prompt(self.task.dataset, s.input)) for s in samples]


@BACKBONES.register("rag")
class RAG(Backbone):
    name = "rag"

    def __init__(self, cfg, task, retriever):
        super().__init__(cfg, task, retriever)
        self.dataset = task.dataset
        self.k = cfg.k if cfg.k is not None else self.dataset.rag_k

    def render(self, sample: Sample, items: Sequence[HistoryItem]) -> str:
        return render_with_history(self.dataset, sample.input, items)

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        if self.cfg.memory == "last":  # the k most recent items, most recent first
            prompts = []
            for s in samples:
                items = sorted(s.history, key=lambda h: -(h.timestamp or 0.0))[: self.k]
                prompts.append(Prompt(self.render(s, items), [h.id for h in items]))
            return prompts
        with_history = [i for i, s in enumerate(samples) if s.history]
        rankings: dict[int, list[tuple[int, float]]] = {}
        if with_history and self.k > 0:
            ranked = self._retriever().rank_many(
                [self.task.retrieval_query(samples[i]) for i in with_history],
                [[self.task.history_document(h) for h in samples[i].history] for i in with_history],
                self.k,
            )
            rankings = dict(zip(with_history, ranked))
        prompts = []
        for i, s in enumerate(samples):
            items = [s.history[j] for j, _ in rankings.get(i, [])]
            prompts.append(Prompt(self.render(s, items), [h.id for h in items]))
        return prompts
