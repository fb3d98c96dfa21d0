"""Web function calling, PersonalWAB single-turn (``dataset.task_type=function_calling``).

The model answers a shopping request with one JSON tool call; the call is parsed
(:func:`parse_call`), executed against a :class:`ToolEnvironment` and scored:

- ``function_accuracy``: 1 when the called tool is the one the task type needs
  (search -> ``search_product_by_query``, recommend -> ``get_recommendations_by_history``,
  review -> ``add_product_review``), else 0;
- ``result_accuracy``: search / recommend ``1 - i / len(results)`` for the first result
  (0-based rank i) that is the target product, 0 when it is not among them; review: the
  cosine similarity of the mean-pooled, L2-normalised MiniLM embeddings of the written
  and the gold review. A wrong tool, an unparseable output, an unknown tool or bad
  arguments score 0 on both, and are counted by kind (``n_unparseable``,
  ``n_unknown_tool``, ``n_missing_argument``, ``n_bad_argument_type``,
  ``n_extra_argument``, ``n_wrong_tool``).

Every sample's calls are executed in one batch: all searches through one BM25 index
build, all recommendations through one recommender, all reviews in one encoder call.

Contrastive pairs: chosen = the task's gold call, rejected = a call the generator makes
with other users' memory, kept when it names a wrong (valid) tool, or searches with
result accuracy below ``dataset.pwab.search_threshold`` or writes a review less similar
than ``dataset.pwab.review_threshold`` (a right-tool recommendation is never rejected).
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fints_repro.config import PairsConfig
from fints_repro.data.load import pwab_files
from fints_repro.data.pwab import ARGUMENT_OF_TOOL, TOOL_OF_TYPE, call_json, product_text
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError
from fints_repro.retrieval.bm25 import BM25Retriever
from fints_repro.tasks.base import TASKS, PairVerdict, Scores, Task
from fints_repro.tasks.json_scan import JsonScan, fence_bodies
from fints_repro.tasks.prompts import render_with_history
from fints_repro.text import valid_unicode

log = logging.getLogger(__name__)

ERROR_KINDS = ("unparseable", "unknown_tool", "missing_argument", "bad_argument_type",
               "extra_argument")


# ---- parsing ----------------------------------------------------------------------------
def _as_call(obj: Any) -> dict | None:
    """The {name, arguments} of a parsed JSON value, with or without the wrapper."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("tool_call"), dict):
        obj = obj["tool_call"]
    if isinstance(obj.get("name"), str):
        return obj
    return None


def _json_objects(text: str):
    """Every JSON object in ``text``: the whole text, each code fence's body, then each
    object in the order of its ``{`` (``json_scan``: linear time, bounded nesting)."""
    scan = JsonScan(text)
    yield scan.whole()
    for start, stop in fence_bodies(text):
        yield scan.whole(start, stop)
    yield from scan.objects()


# The benchmark's other tools (pwab/functions): what a rejected call to them may carry
# (dataset.pwab.pair_other_tools).
OTHER_TOOLS = {"stop": (), "get_product_details_by_asin": ("product_asin",)}


def parse_call(text: str, mode: str = "lenient", other_tools: bool = False,
               sequence_as_string: str = "bad_argument") -> dict[str, Any]:
    """``{"name", "arguments"}`` of the generation's tool call, or ``{"error": kind}``
    (kind in ``ERROR_KINDS``; ``name`` kept where one was found).

    ``lenient`` (ours): the first JSON object that is a call, with or without the
    ``"tool_call"`` wrapper, also inside code fences or with text around it. ``strict``
    (the authors' evaluation): ``json.loads`` of the whole generation, stripped, must give
    ``{"tool_call": {"name": ..., "arguments": {...}}}``.

    ``other_tools``: a call to one of ``OTHER_TOOLS`` with the arguments it takes is a call
    (a pair's wrong-tool rejected side); ``sequence_as_string="empty_results"``: a
    ``product_sequence`` given as a string is kept as it is (the benchmark's tool reads
    its characters and finds no product; ``execute`` scores it so).

    Any text is read, in time linear in its length: objects nested deeper than
    ``json_scan.MAX_DEPTH`` levels are not read, and strings in the call are valid Unicode
    (an escaped lone surrogate, ``"\\ud800"``, becomes U+FFFD), so that the call can be
    written and tokenised."""
    call = None
    if mode == "strict":
        obj = JsonScan(text).whole()
        if isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict):
            call = _as_call(obj["tool_call"])
    else:
        call = next((c for c in map(_as_call, _json_objects(text)) if c is not None), None)
    if call is None:
        return {"error": "unparseable"}
    name, args = valid_unicode(call["name"]), call.get("arguments", {})
    if other_tools and name in OTHER_TOOLS and isinstance(args, dict) and set(args) == set(
            OTHER_TOOLS[name]) and all(isinstance(v, str) for v in args.values()):
        return {"name": name, "arguments": {k: valid_unicode(v) for k, v in args.items()}}
    if name not in ARGUMENT_OF_TOOL:
        return {"error": "unknown_tool", "name": name}
    if not isinstance(args, dict):
        return {"error": "bad_argument_type", "name": name}
    key, kind = ARGUMENT_OF_TOOL[name]
    if key not in args:
        return {"error": "missing_argument", "name": name}
    value = args[key]
    ok = isinstance(value, kind) and (kind is not list or all(isinstance(v, str) for v in value))
    if (not ok and kind is list and isinstance(value, str)
            and sequence_as_string == "empty_results" and set(args) == {key}):
        return {"name": name, "arguments": {key: valid_unicode(value)}}
    if not ok:
        return {"error": "bad_argument_type", "name": name}
    if set(args) != {key}:
        return {"error": "extra_argument", "name": name}
    value = [valid_unicode(v) for v in value] if kind is list else valid_unicode(value)
    return {"name": name, "arguments": {key: value}}


# ---- the tool environment ---------------------------------------------------------------
class CooccurrenceRecommender:
    """Item-to-item co-occurrence over the users' training-split histories (ours; the
    benchmark's recommender is a SASRec model): a candidate's score is the number of
    training histories it shares with each item of the sequence, summed; ties and the
    remaining places go to the most bought products; items of the sequence are left out."""

    def __init__(self, sequences: Sequence[Sequence[str]], catalogue: Sequence[str]):
        self.co: dict[str, Counter] = defaultdict(Counter)
        self.popularity: Counter = Counter()
        for seq in sequences:
            items = list(dict.fromkeys(seq))
            self.popularity.update(items)
            for a in items:
                for b in items:
                    if a != b:
                        self.co[a][b] += 1
        order = {a: i for i, a in enumerate(catalogue)}
        self.by_popularity = sorted(catalogue, key=lambda a: (-self.popularity[a], order[a]))
        self.order = order

    def recommend(self, sequence: Sequence[str], k: int) -> list[str]:
        seq = [a for a in sequence if a in self.order]
        if not seq:
            return []
        score: Counter = Counter()
        for a in seq:
            score.update(self.co.get(a, {}))
        seen = set(seq)
        ranked = sorted((c for c in score if c not in seen),
                        key=lambda c: (-score[c], -self.popularity[c], self.order[c]))
        out = ranked[:k]
        for c in self.by_popularity:
            if len(out) >= k:
                break
            if c not in seen and c not in out:
                out.append(c)
        return out


class ToolEnvironment:
    """The three tools over one catalogue, executed in batches."""

    def __init__(self, products: Mapping[str, dict], history: Mapping[str, Sequence[dict]],
                 cfg):
        self.cfg = cfg  # dataset.pwab
        self.asins = list(products)
        self.texts = [product_text(products[a]) for a in self.asins]
        self.sasrec = None
        if cfg.recommender == "sasrec":
            from fints_repro.tasks.sasrec import SASRecRecommender

            self.sasrec = SASRecRecommender(cfg.sasrec_checkpoint, cfg.sasrec_item_ids, cfg.max_sequence)
        train = [[it["product_info"]["parent_asin"] for it in
                  sorted(items, key=lambda it: it["review"]["timestamp"])
                  if it.get("split", "train") == "train"] for items in history.values()]
        self.recommender = CooccurrenceRecommender(train, self.asins)

    @functools.cached_property
    def _bm25(self):
        return BM25Retriever(k1=self.cfg.bm25_k1, b=self.cfg.bm25_b)

    def search(self, queries: Sequence[str]) -> list[list[str]]:
        """Top ``search_k`` ASINs per query (products with a positive BM25 score only, as
        a Lucene search returns matching documents only)."""
        if not queries:
            return []
        ranked = self._bm25.rank_many(list(queries), [self.texts] * len(queries), self.cfg.search_k)
        return [[self.asins[j] for j, s in r if s > 0] for r in ranked]

    def recommend(self, sequences: Sequence[Sequence[str]]) -> list[list[str]]:
        n = self.cfg.max_sequence
        if self.sasrec is not None:
            return self.sasrec.recommend_many(sequences, self.cfg.recommend_k)
        return [self.recommender.recommend(list(s)[-n:], self.cfg.recommend_k) for s in sequences]

    @functools.cached_property
    def result_texts(self) -> dict[str, str] | None:
        """ASIN -> the product's text, where a hit is the target's ASIN in a result's text
        (``hit=substring``); None where a hit is the target product itself."""
        return dict(zip(self.asins, self.texts)) if self.cfg.hit == "substring" else None

    @functools.cached_property
    def _encoder(self):
        from fints_repro.retrieval.dense import resolve_sentence_model, sentence_model

        return sentence_model(resolve_sentence_model(self.cfg.review_encoder), "mean",
                     self.cfg.review_max_tokens)

    def review_similarity(self, written: Sequence[str], gold: Sequence[str]) -> list[float]:
        """Cosine of the normalised embeddings of each written and gold review; an empty
        written review scores 0, or is scored as the text ``empty_review`` (the benchmark's
        tool returns "No review provided." for it)."""
        if not written:
            return []
        placeholder = self.cfg.empty_review
        texts = [valid_unicode(w if w or placeholder is None else placeholder) for w in written]
        empty = [placeholder is None and not w.strip() for w in written]
        vecs = self._encoder.encode(texts + [valid_unicode(g) for g in gold],
                                    normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        a, b = vecs[: len(written)], vecs[len(written):]
        return [0.0 if e else float(x) for e, x in zip(empty, np.sum(a * b, axis=1))]


def rank_score(results: Sequence[str], target: str,
               text_of: Mapping[str, str] | None = None) -> float:
    """``1 - i / len(results)`` for the first result i that is ``target``, else 0; with
    ``text_of`` (ASIN -> the product's text, as the benchmark's tools return it), for the
    first result whose text contains ``target`` (its ``target_asin in observation[i]``)."""
    for i, asin in enumerate(results):
        if asin == target if text_of is None else target in text_of[asin]:
            return 1.0 - i / len(results)
    return 0.0


@dataclass
class Execution:
    function_accuracy: float
    result_accuracy: float
    error: str | None  # a parse error kind, "wrong_tool", or None


def execute(env: ToolEnvironment, calls: Sequence[Mapping[str, Any]], types: Sequence[str],
            target_asins: Sequence[str], target_reviews: Sequence[str]) -> list[Execution]:
    """Each call executed and scored against its task; one batch per tool."""
    out: list[Execution | None] = [None] * len(calls)
    by_tool: dict[str, list[int]] = defaultdict(list)
    for i, (c, t) in enumerate(zip(calls, types)):
        if "error" in c:
            out[i] = Execution(0.0, 0.0, c["error"])
        elif c["name"] != TOOL_OF_TYPE[t]:
            out[i] = Execution(0.0, 0.0, "wrong_tool")
        else:
            by_tool[c["name"]].append(i)
    text_of = env.result_texts
    rows = by_tool["search_product_by_query"]
    for i, res in zip(rows, env.search([calls[i]["arguments"]["query"] for i in rows])):
        out[i] = Execution(1.0, rank_score(res, target_asins[i], text_of), None)
    rows = by_tool["get_recommendations_by_history"]
    # a sequence given as a string (sequence_as_string=empty_results): no product found
    sequences = [calls[i]["arguments"]["product_sequence"] for i in rows]
    sequences = [[] if isinstance(seq, str) else seq for seq in sequences]
    for i, res in zip(rows, env.recommend(sequences)):
        out[i] = Execution(1.0, rank_score(res, target_asins[i], text_of), None)
    rows = by_tool["add_product_review"]
    sims = env.review_similarity([calls[i]["arguments"]["review"] for i in rows],
                                 [target_reviews[i] for i in rows])
    for i, sim in zip(rows, sims):
        out[i] = Execution(1.0, sim, None)
    return out  # type: ignore[return-value]


# ---- the task -----------------------------------------------------------------------------
@TASKS.register("function_calling")
class FunctionCallingTask(Task):
    name = "function_calling"
    target_type = str  # the gold call, JSON
    metric_names = ("function_accuracy", "result_accuracy")
    primary_metric = "result_accuracy"
    # A per-user adapter learns to call tools: the user's training tasks -> gold calls
    # (history items are product -> review texts, not calls)
    lora_train_on = "train_samples"

    def check_inputs(self) -> None:
        w = self.dataset.pwab
        if w.recommender != "sasrec":
            return
        for key in ("sasrec_checkpoint", "sasrec_item_ids"):
            path = getattr(w, key)
            if not path or not Path(path).is_file():
                raise ConfigError(
                    f"dataset.pwab.recommender=sasrec needs dataset.pwab.{key}, and {path!r} is "
                    "not a file. The benchmark ships them as PersonalWAB/envs/pwab/functions/"
                    "recommender/checkpoint/pwab.pth and recommender/data/1000_ids.json; without "
                    "them, dataset.pwab.recommender=cooccurrence (ours) recommends from the users' "
                    "training histories")

    @functools.cached_property
    def environment(self) -> ToolEnvironment:
        files = pwab_files(self.dataset, self.seed)
        return ToolEnvironment(files.products, files.history, self.dataset.pwab)

    def parse(self, generation: str) -> dict[str, Any]:
        w = self.dataset.pwab
        return parse_call(self.read(generation), w.parse, sequence_as_string=w.sequence_as_string)

    def reward_text(self, generation: str) -> str:
        """A parseable call in the pairs' serialisation (``call_json``); anything else as
        written (a reward model scores it too, as the text it is)."""
        return self.pair_answer(generation, "") or self.read(generation).strip()

    def score_predictions(self, predictions: Sequence[dict], samples: Sequence[Sample],
                          seed: int, values=None) -> Scores:
        t0 = time.time()
        ex = execute(self.environment, predictions, [s.type for s in samples],
                     [s.meta["target_asin"] for s in samples],
                     [s.meta.get("target_review", "") for s in samples])
        per = [{"function_accuracy": e.function_accuracy, "result_accuracy": e.result_accuracy,
                "call_error": e.error} for e in ex]
        kinds = Counter(e.error for e in ex if e.error)
        agg: dict[str, Any] = {"n": len(samples)}
        for name in self.metric_names:
            agg[name] = statistics.fmean(r[name] for r in per) if per else 0.0
        for kind in (*ERROR_KINDS, "wrong_tool"):
            agg[f"n_{kind}"] = kinds.get(kind, 0)
        agg["seconds_tools"] = round(time.time() - t0, 3)
        return Scores(agg, per)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "types": list(TOOL_OF_TYPE)}

    # ---- contrastive pairs ----------------------------------------------------------------
    @staticmethod
    def _task_of(item: HistoryItem) -> Sample:
        s = item.meta.get("sample")
        if s is None:
            raise ConfigError("function calling: contrastive pairs are made from the users' "
                              "training tasks (their gold calls); set "
                              "steering.pairs.source=train_samples")
        return s

    def pair_pool(self, items: Mapping[str, Sequence[HistoryItem]]) -> dict[str, list[HistoryItem]]:
        """The other users' memory a rejected call is generated with: each user's history
        items (purchases and reviews) over the user's training tasks, deduplicated."""
        pool: dict[str, list[HistoryItem]] = {}
        for user, its in items.items():
            seen: dict[str, HistoryItem] = {}
            for it in its:
                for h in self._task_of(it).history:
                    seen.setdefault(h.id, h)
            pool[user] = list(seen.values())
        return pool

    def pair_prompt(self, others: Sequence[HistoryItem], item: HistoryItem, layout: str) -> str:
        return render_with_history(self.dataset, item.input, others)

    def pair_answer(self, generation: str, layout: str) -> str:
        w = self.dataset.pwab
        call = parse_call(self.read(generation), "lenient", other_tools=w.pair_other_tools,
                          sequence_as_string=w.sequence_as_string)
        return "" if "error" in call else call_json(call["name"], call["arguments"])

    def task_text(self, item: HistoryItem) -> str:
        """The bare task text of a training task (the authors' pair question)."""
        return self._task_of(item).meta.get("task", item.input)

    def accept_pairs(self, triples: Sequence[tuple[str, str, HistoryItem]],
                     pairs: PairsConfig | None = None) -> list[PairVerdict]:
        w = self.dataset.pwab
        tasks = [self._task_of(item) for _, _, item in triples]
        calls = [parse_call(r, "lenient", other_tools=w.pair_other_tools,
                            sequence_as_string=w.sequence_as_string) for _, r, _ in triples]
        ex = execute(self.environment, calls, [s.type for s in tasks],
                     [s.meta["target_asin"] for s in tasks],
                     [s.meta.get("target_review", "") for s in tasks])
        out = []
        for s, e in zip(tasks, ex):
            if e.error == "wrong_tool":
                keep = True
            elif e.error is not None or s.type == "recommend":
                keep = False
            else:
                keep = e.result_accuracy < (w.search_threshold if s.type == "search"
                                            else w.review_threshold)
            out.append(PairVerdict(keep, e.result_accuracy))
        return out

    def pair_sides(self, chosen: str, rejected: str, pairs: PairsConfig | None = None
                   ) -> tuple[str, str]:
        """``call_serialisation=authors``: chosen as the bare call and rejected with the
        wrapper, both by ``json.dumps`` with its defaults (``ensure_ascii=True``), as the
        authors' train.py writes them."""
        if pairs is not None and pairs.call_serialisation == "authors":
            chosen = json.dumps(json.loads(chosen)["tool_call"])
            rejected = json.dumps(json.loads(rejected))
        return chosen, rejected
