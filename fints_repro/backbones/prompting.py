"""Prompting backbones: zero-shot (the task input alone) and RAG (the user's top-k history
items, retrieved for the input, rendered by the dataset's templates before the input)."""

from __future__ import annotations

from typing import Sequence

from fints_repro.backbones.base import BACKBONES, Backbone, Prompt
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.tasks.prompts import render_with_history, zero_shot_prompt


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
