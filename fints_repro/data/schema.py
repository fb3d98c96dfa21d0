"""The one internal data schema every loader produces and every stage consumes.

A *sample* is one test question of one user, with that user's history. A *history item*
is one earlier (input, output) of the same user: for LaMP-4 the article and its headline,
for LaMP-5 the abstract and its title, for LongLaMP abstract generation the title (and
keywords) and the abstract. ``input``/``output`` are the task's two sides, so that prompts,
retrieval and contrastive pairs are written once for every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class HistoryItem:
    id: str
    input: str  # the item's input side (article, abstract, paper title ...)
    output: str  # the user's own output for it (headline, title, abstract ...)
    timestamp: float | None = None  # seconds or any monotone number; None when unknown
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Sample:
    id: str
    user: str
    input: str  # the full task input as the dataset gives it ("Generate a headline for ...: <article>")
    target: str | None  # gold output; None where the split has no labels
    history: tuple[HistoryItem, ...] = ()
    timestamp: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # The sample's kind within its task (e.g. search | recommend | review); scores are
    # also aggregated per type. None: the task has one kind.
    type: str | None = None

    def with_history(self, history: tuple[HistoryItem, ...] | list[HistoryItem]) -> "Sample":
        return replace(self, history=tuple(history))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "input": self.input,
            "target": self.target,
            "timestamp": self.timestamp,
            "type": self.type,
            "history": [
                {"id": h.id, "input": h.input, "output": h.output, "timestamp": h.timestamp}
                for h in self.history
            ],
        }
