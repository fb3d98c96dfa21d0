from __future__ import annotations

from typing import Callable, Protocol, Sequence

from fints_repro.config import RetrieverConfig
from fints_repro.registry import Registry

Ranking = list[tuple[int, float]]


class Retriever(Protocol):
    name: str

    def rank_many(
        self, queries: Sequence[str], docs_per_query: Sequence[Sequence[str]], k: int
    ) -> list[Ranking]: ...


# Each retriever module (bm25.py, dense.py) registers its options.
RETRIEVERS: Registry[Callable[[RetrieverConfig], Retriever]] = Registry(
    "retriever", package="fints_repro.retrieval")


def build_retriever(cfg: RetrieverConfig) -> Retriever:
    return RETRIEVERS.get(cfg.name, "retriever.name")(cfg)


def group_by_docs(docs_per_query: Sequence[Sequence[str]]) -> dict[tuple[str, ...], list[int]]:
    """Queries that share a candidate set (the same user's history) are ranked together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for qi, docs in enumerate(docs_per_query):
        groups.setdefault(tuple(docs), []).append(qi)
    return groups
