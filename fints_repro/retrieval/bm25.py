"""BM25 (Okapi, bm25s defaults k1=1.5, b=0.75) over each user's history."""

from __future__ import annotations

from typing import Sequence

import bm25s
import numpy as np

from fints_repro.retrieval.base import Ranking, group_by_docs


class BM25Retriever:
    name = "bm25"

    def rank_many(
        self, queries: Sequence[str], docs_per_query: Sequence[Sequence[str]], k: int
    ) -> list[Ranking]:
        out: list[Ranking] = [[] for _ in queries]
        for docs, qidx in group_by_docs(docs_per_query).items():
            if not docs or k <= 0:
                continue
            kk = min(k, len(docs))
            index = bm25s.BM25()
            index.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False),
                        show_progress=False)
            q_tokens = bm25s.tokenize([queries[i] for i in qidx], stopwords="en",
                                      show_progress=False)
            # Score every document and rank here: stable on ties, and a query whose words
            # are all unknown to the index gets zeros instead of an error.
            vocab_inv = {v: t for t, v in q_tokens.vocab.items()}
            for row, qi in enumerate(qidx):
                words = [vocab_inv[i] for i in q_tokens.ids[row]]
                scores = np.asarray(index.get_scores(words), dtype=np.float64)
                order = np.argsort(-scores, kind="stable")[:kk]
                out[qi] = [(int(j), float(scores[j])) for j in order]
        return out
