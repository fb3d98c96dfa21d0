from __future__ import annotations

from typing import Protocol, Sequence

from fints_repro.config import RetrieverConfig
from fints_repro.errors import ConfigError

Ranking = list[tuple[int, float]]


class Retriever(Protocol):
    name: str

    def rank_many(
        self, queries: Sequence[str], docs_per_query: Sequence[Sequence[str]], k: int
    ) -> list[Ranking]: ...


def build_retriever(cfg: RetrieverConfig) -> Retriever:
    if cfg.name == "bm25":
        from fints_repro.retrieval.bm25 import BM25Retriever

        return BM25Retriever()
    if cfg.name in ("minilm", "contriever", "dense"):
        from fints_repro.retrieval.dense import DenseRetriever

        return DenseRetriever(cfg)
    raise ConfigError(f"unknown retriever.name={cfg.name!r} (bm25 | minilm | contriever)")


def group_by_docs(docs_per_query: Sequence[Sequence[str]]) -> dict[tuple[str, ...], list[int]]:
    """Queries that share a candidate set (the same user's history) are ranked together."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for qi, docs in enumerate(docs_per_query):
        groups.setdefault(tuple(docs), []).append(qi)
    return groups
