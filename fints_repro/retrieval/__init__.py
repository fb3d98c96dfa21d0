"""Retrievers behind one interface: ``rank_many(queries, docs_per_query, k)``.

Each query comes with its own candidate documents (a user's history), and the answer is,
per query, the top-k ``(doc index, score)`` pairs, best first. Sparse (BM25, bm25s) and
dense (sentence-transformers: MiniLM shipped in a wheel, Contriever from a hub or a local
copy) retrievers are interchangeable through ``build_retriever(cfg)``.
"""

from fints_repro.retrieval.base import Retriever, build_retriever

__all__ = ["Retriever", "build_retriever"]
