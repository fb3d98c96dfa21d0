"""BM25 with bm25s (its default Lucene variant, idf = ln(1 + (N - df + 0.5) / (df + 0.5));
k1=1.5, b=0.75 unless given): over each user's history (the ``bm25`` retriever), and over
a catalogue (function calling's search tool, k1=0.9, b=0.4 as Lucene's searcher)."""

from __future__ import annotations

import logging
from typing import Sequence

import bm25s
import numpy as np

from fints_repro.config import RetrieverConfig
from fints_repro.retrieval.base import RETRIEVERS, Ranking, group_by_docs

logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build


def _tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class BM25Retriever:
    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b

    def rank_many(
        self, queries: Sequence[str], docs_per_query: Sequence[Sequence[str]], k: int
    ) -> list[Ranking]:
        out: list[Ranking] = [[] for _ in queries]
        for docs, qidx in group_by_docs(docs_per_query).items():
            if not docs or k <= 0:
                continue
            kk = min(k, len(docs))
            doc_tokens = _tokenize(list(docs))
            index = None
            if any(len(ids) for ids in doc_tokens.ids):  # else: nothing to match, all zeros
                index = bm25s.BM25(k1=self.k1, b=self.b)
                index.index(doc_tokens, show_progress=False)
            q_tokens = _tokenize([queries[i] for i in qidx])
            vocab_inv = {v: t for t, v in q_tokens.vocab.items()}
            for row, qi in enumerate(qidx):
                # Score every document and rank here: stable on ties, and a query with no
                # usable word (empty, stopwords only, unknown words) gets zeros.
                words = [vocab_inv[i] for i in q_tokens.ids[row]]
                scores = np.zeros(len(docs))
                if index is not None and words:
                    scores = np.asarray(index.get_scores(words), dtype=np.float64)
                order = np.argsort(-scores, kind="stable")[:kk]
                out[qi] = [(int(j), float(scores[j])) for j in order]
        return out


@RETRIEVERS.register("bm25")
def bm25_retriever(cfg: RetrieverConfig) -> BM25Retriever:
    return BM25Retriever()
