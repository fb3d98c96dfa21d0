"""The stages of one method's run, each a function with typed inputs and outputs:

    fit → prompts → steering plan → generate → select → parse and score → write

``RunContext`` is what every stage may use (the config, the task, the samples, the run's
model and what is built on first use: retrievers, other models, the training-split items).
``pipeline.run_method`` chains the stages; the bench scripts call the ones they time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

from fints_repro.backbones import Backbone, FitContext, Prompt
from fints_repro.cache import (
    GenerationStore,
    append_jsonl,
    content_hash,
    make_dir,
    read_jsonl_lenient,
    write_json_atomic,
    write_jsonl_atomic,
)
from fints_repro.compose import Method, compose_group, compose_run, method_name
from fints_repro.config import ModelConfig, RunConfig, SteeringConfig
from fints_repro.data.load import SplitReader, load_samples, whole_split
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import DataError
from fints_repro.models.chat import clip_chat_prompts
from fints_repro.models.engines import close_engine, engine_for, engine_key, rows_need, with_engine
from fints_repro.models.generation import DecodingParams, resolve_decoding
from fints_repro.models.inspect import shape_of
from fints_repro.models.loading import LoadedModel, load_model
from fints_repro.retrieval import Retriever, build_retriever
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.tasks import Task, build_task
from fints_repro.tasks.base import Scores

log = logging.getLogger(__name__)


def with_task_system_prompt(lm: LoadedModel, system_prompt: str | None) -> LoadedModel:
    """``lm`` whose chat prompts start with the task's system prompt (``dataset.
    system_prompt``: function calling's rules and tools), then the model's own."""
    if not system_prompt:
        return lm
    both = system_prompt if not lm.system_prompt else f"{system_prompt}\n\n{lm.system_prompt}"
    return dataclasses.replace(lm, system_prompt=both)


@dataclass
class RunContext:
    """One run's shared state. ``lm`` (the run's model) is set once the start-up checks,
    which need none, have passed; retrievers, other models (a separate pair generator, a
    reward encoder) and the training-split items are built on first use, once."""

    cfg: RunConfig
    task: Task
    samples: list[Sample]
    overrides: list[str] = field(default_factory=list)  # what cfg was composed from
    reader: SplitReader = field(default_factory=SplitReader)
    lm: Optional[LoadedModel] = None
    _retrievers: dict[Optional[str], Retriever] = field(default_factory=dict, repr=False)
    _models: dict[str, LoadedModel] = field(default_factory=dict, repr=False)
    _train_items: Optional[dict[str, list[HistoryItem]]] = field(default=None, repr=False)
    # Every evaluated sample of the experiment when this run is one part of it
    # (shard.count > 1; empty otherwise): what stages over all users see (pairs' other
    # users, BiPO with scope=all).
    all_samples: list[Sample] = field(default_factory=list)

    def retriever(self, name: str | None = None) -> Retriever:
        """The run's retriever, or the ``retriever`` group option ``name`` (built once)."""
        if name == self.cfg.retriever.name:
            name = None
        if name not in self._retrievers:
            rcfg = self.cfg.retriever if name is None else compose_group(self.overrides, "retriever", name)
            self._retrievers[name] = build_retriever(rcfg)
        return self._retrievers[name]

    def model(self, name: str | None) -> LoadedModel:
        """The run's model (``name`` None or its own), or a ``model`` group option."""
        if name is None or name == self.cfg.model.name:
            if self.lm is None:
                raise RuntimeError("the run's model is asked for before it was loaded")
            return self.lm
        if name not in self._models:
            mcfg: ModelConfig = compose_group(self.overrides, "model", name)
            self._models[name] = with_task_system_prompt(
                with_engine(load_model(mcfg, self.cfg.cache_dir), self.cfg.engine),
                self.cfg.dataset.system_prompt)
        return self._models[name]

    def close(self) -> None:
        """Release the engines' models (transformers' stay: the caller holds them)."""
        for lm in [self.lm, *self._models.values()]:
            if lm is not None:
                close_engine(lm)

    def train_items(self) -> dict[str, list[HistoryItem]]:
        """Per user, the items of the dataset's training split (steering.pairs.source=
        train_samples, as the authors' code): each training sample's (input, gold output),
        and with ``dataset.train_items_with_profile`` its profile items too. Read once."""
        if self._train_items is None:
            d = self.cfg.dataset
            items: dict[str, dict[str, HistoryItem]] = {}
            for s in load_samples(whole_split(d, d.train_split), seed=self.cfg.seed,
                                  reader=self.reader):
                mine = items.setdefault(s.user, {})
                if s.target is not None:  # meta: the task behind the item (function calling)
                    mine.setdefault(s.id, HistoryItem(s.id, s.input, s.target, s.timestamp,
                                                      meta={"sample": s}))
                if d.train_items_with_profile:
                    for h in s.history:
                        mine.setdefault(h.id, h)
            self._train_items = {u: list(v.values()) for u, v in items.items()}
            log.info("pairs from the %r split: %d items of %d users", d.train_split,
                     sum(map(len, self._train_items.values())), len(self._train_items))
        return self._train_items

    def steering_inputs(self, steering: SteeringConfig) -> SteeringInputs:
        """What a steering method gets besides the model and the samples."""
        return SteeringInputs(
            dataset=self.cfg.dataset, task=self.task, cache_dir=self.cfg.cache_dir,
            seed=self.cfg.seed, retriever=self.retriever,
            generator=lambda: self.model(steering.pairs.generator),
            layers_path=self.cfg.model.layers_path, progress=self.cfg.progress,
            pair_items=self.train_items, overlength=self.cfg.generation.overlength,
            all_samples=self.all_samples,
        )

    def fit_context(self, method: Method) -> FitContext:
        """What a backbone's ``fit`` gets for ``method``."""
        g = method.generation
        return FitContext(
            cache_dir=Path(self.cfg.cache_dir), seed=self.cfg.seed, progress=self.cfg.progress,
            pairs=method.steering.pairs, pair_source=self.steering_inputs(method.steering),
            train_items=self.train_items, model=self.model, batch_size=g.batch_size,
            overlength=g.overlength)


def open_run(overrides: Sequence[str], *, with_model: bool = True) -> RunContext:
    """A run's context from Hydra overrides, built as ``run`` builds it (the composed
    config, its task, its samples and, ``with_model``, its model): for scripts that time or
    inspect single stages."""
    cfg = compose_run(overrides)
    reader = SplitReader()
    ctx = RunContext(cfg, build_task(cfg.dataset, cfg.generation, cfg.eval, cfg.seed),
                     load_samples(cfg.dataset, seed=cfg.seed, reader=reader), list(overrides), reader)
    if with_model:
        ctx.lm = with_task_system_prompt(load_model(cfg.model, cfg.cache_dir),
                                         cfg.dataset.system_prompt)
    return ctx


def config_method(cfg: RunConfig) -> Method:
    """The method the config's own backbone, steering and generation nodes make."""
    return Method(method_name(cfg.backbone.name, cfg.steering.name), cfg.backbone,
                  cfg.steering, cfg.generation)


# ------------------------------------------------------------------ fit


def fit(ctx: RunContext, method: Method, backbone: Backbone, base_lm: LoadedModel) -> LoadedModel:
    """The backbone's per-user preparation; returns the model that generation and
    extraction run on (LoRA: the wrapper holding every user's adapter)."""
    backbone.fit(base_lm, ctx.samples, ctx.fit_context(method))
    return backbone.model(base_lm)


# ------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompts:
    prompts: list[Prompt]  # the user turn of each sample and the history items it used
    texts: list[str]  # chat-rendered, fitted to the context
    params: DecodingParams
    n_truncated: int


def decoding(ctx: RunContext, method: Method, backbone: Backbone, base_lm: LoadedModel) -> DecodingParams:
    """The method's decoding settings (its own generation node, or the run's), nulls taken
    from the checkpoint's generation config, then as the backbone changes them."""
    g = method.generation
    return backbone.decoding(resolve_decoding(
        g.do_sample, g.temperature, g.top_p, base_lm.model,
        max_new_tokens=g.max_new_tokens or ctx.cfg.dataset.max_new_tokens, seed=ctx.cfg.seed))


def clip_prompts(lm: LoadedModel, samples: Sequence[Sample], prompts: Sequence[Prompt],
                max_new_tokens: int, overlength: str, method: str) -> tuple[list[str], int]:
    """The chat-rendered prompts, checked against the model's context before any model time:
    a prompt whose tokens plus ``max_new_tokens`` exceed it stops the run naming the sample
    (``overlength=error``) or is cut in its middle (``truncate``; counted and logged)."""
    def too_long(i: int, n: int) -> Exception:
        return DataError(
            f"[{method}] the prompt of sample {samples[i].id!r} (user {samples[i].user!r}) has "
            f"{n} tokens; with {max_new_tokens} new tokens it exceeds the model's context of "
            f"{limit}. Set generation.overlength=truncate to cut such prompts in the middle, "
            "or shorten them (dataset.history_max_words, backbone.k, generation.max_new_tokens).",
            record=samples[i].id)

    limit = shape_of(lm.model).max_positions
    texts, over = clip_chat_prompts(lm.tokenizer, [p.text for p in prompts], lm.system_prompt,
                                   limit, max_new_tokens, overlength, too_long)
    if over:
        log.warning("[%s] %d prompt(s) longer than the context (%d tokens with %d new) were "
                    "cut in the middle", method, len(over), limit, max_new_tokens)
    return texts, len(over)


def build_prompts(ctx: RunContext, method: Method, backbone: Backbone, lm: LoadedModel,
                  params: DecodingParams) -> Prompts:
    prompts = backbone.build_prompts(ctx.samples)
    texts, n_truncated = clip_prompts(lm, ctx.samples, prompts, params.max_new_tokens,
                                     method.generation.overlength, method.name)
    return Prompts(prompts, texts, params, n_truncated)


# ------------------------------------------------------------------ steering plan


def steering_plan(ctx: RunContext, method: Method, backbone: Backbone, lm: LoadedModel
                  ) -> SteeringPlan | None:
    """The method's per-row vectors (None: unsteered), extracted on ``lm`` (with each
    user's adapter where ``steering.extract_with_adapter``)."""
    inputs = ctx.steering_inputs(method.steering)
    if method.steering.extract_with_adapter:
        inputs = dataclasses.replace(
            inputs, user_context=lambda users: backbone.user_context(lm, users),
            user_identity=backbone.user_identity)
    return STEERING.get(method.steering.name)(method.steering, lm, ctx.samples, inputs)


# ------------------------------------------------------------------ generate


@dataclass(frozen=True)
class Generated:
    candidates: list[list[str]]  # per row, its N candidates
    row_keys: list[str]  # per row, what its cached output is valid for
    n_generated: int
    n_cached: int


def row_key(text: str, digest: str, identity: str, candidate: int | None) -> str:
    """Everything that decides one generated text, hashed: the prompt, the row's steering
    vectors' digest, the backbone's row identity, the candidate index. Unsteered, plain
    rows of one candidate hash the prompt alone."""
    parts = [text]
    if digest:
        parts.append(digest)
    if identity:
        parts.append("backbone:" + identity)
    if candidate is not None:
        parts.append(f"candidate:{candidate}")
    return GenerationStore.key("\0".join(parts))


def combined_context(contexts: Sequence[Callable[[list[int]], ContextManager] | None]):
    """One per-batch context that enters each of ``contexts`` (backbone, then steering) and
    yields the union of the generate keyword arguments they yield."""
    active = [c for c in contexts if c is not None]
    if not active:
        return None

    @contextlib.contextmanager
    def ctx(rows: list[int]) -> Iterator[dict[str, Any]]:
        with contextlib.ExitStack() as stack:
            extra: dict[str, Any] = {}
            for c in active:
                got = stack.enter_context(c(rows))
                if isinstance(got, dict):
                    extra.update(got)
            yield extra

    return ctx


def generate(ctx: RunContext, method: Method, backbone: Backbone, lm: LoadedModel,
             prompts: Prompts, plan: SteeringPlan | None, out_dir: Path) -> Generated:
    """N candidates per row, each cached on disk by content hash, appended to the method's
    ``predictions.jsonl`` batch by batch: a killed run resumes where it stopped; rows a
    run with the same settings wrote into ``out_dir`` are reused."""
    g, samples, texts, params = method.generation, ctx.samples, prompts.texts, prompts.params
    n_cand = backbone.n_candidates
    needs = rows_need(backbone, plan is not None and any(plan.steered), n_cand)
    engine = engine_for(lm, needs, f"the rows of method {method.name!r}")
    store_key = content_hash([lm.fingerprint, asdict(params), g.batch_size, g.sort_by_length,
                              g.cache_implementation, *engine_key(engine)])
    store = GenerationStore(Path(ctx.cfg.cache_dir) / "generations" / f"{store_key}.jsonl")
    digests = plan.row_digests() if plan else [""] * len(texts)
    candidates_of = [None] if n_cand == 1 else list(range(n_cand))
    keys = [[row_key(t, d, backbone.row_identity(i), c) for c in candidates_of]
            for i, (t, d) in enumerate(zip(texts, digests))]
    row_keys = [hashlib.sha256((store_key + "".join(k)).encode()).hexdigest()[:32] for k in keys]
    done: dict[int, list[str]] = {i: [store.items[k] for k in ks] for i, ks in enumerate(keys)
                                  if all(k in store.items for k in ks)}
    pred_path = out_dir / "predictions.jsonl"
    position = {s.id: i for i, s in enumerate(samples)}
    for row in read_jsonl_lenient(pred_path):
        i = position.get(row.get("id"))
        if i is not None and row.get("cache_key") == row_keys[i] and "candidates" in row:
            done.setdefault(i, list(row["candidates"]))
    if done:
        log.info("[%s] %d/%d rows reused (run dir or cache)", method.name, len(done), len(texts))
    n_cached = len(done)
    context = combined_context([
        lambda rows: backbone.model_context(lm, rows),
        plan.batch_context(lm.model) if plan else None,
    ])
    # the hooks' engine runs each batch inside the contexts (steering, the adapters'
    # wrapper); another engine loads each row's adapter from its files
    per_row = ({"batch_context": context} if engine.runs_hooks else
               {"adapters": [backbone.row_adapter(i) for i in range(len(texts))]})
    for idx, gens in engine.generate(
        lm, texts, params, batch_size=g.batch_size, sort_by_length=g.sort_by_length,
        skip=set(done), progress=ctx.cfg.progress, desc=method.name,
        num_return_sequences=n_cand, cache_implementation=g.cache_implementation, **per_row,
    ):
        per_row = [gens[j * n_cand:(j + 1) * n_cand] for j in range(len(idx))]
        store.add([(k, c) for i, cands in zip(idx, per_row) for k, c in zip(keys[i], cands)])
        append_jsonl(pred_path, [{"id": samples[i].id, "user": samples[i].user, "prompt": texts[i],
                                  "cache_key": row_keys[i], "candidates": cands,
                                  "target": samples[i].target}
                                 for i, cands in zip(idx, per_row)], f"{method.name}'s predictions")
        done.update(zip(idx, per_row))
    return Generated([done[i] for i in range(len(texts))], row_keys, len(done) - n_cached, n_cached)


# ------------------------------------------------------------------ select, parse, score


@dataclass(frozen=True)
class Selected:
    chosen: list[int]  # per row, the index of the candidate that is the prediction
    info: list[dict[str, Any]]  # per row, what the selection reports (rewards, ...)
    raw: list[str]  # per row, the chosen candidate's text
    n_cut: int  # raw texts longer than eval.max_read_chars (only their start is read)


def select(ctx: RunContext, method: Method, backbone: Backbone, generated: Generated) -> Selected:
    chosen, info = backbone.select(ctx.samples, generated.candidates)
    raw = [c[j] for c, j in zip(generated.candidates, chosen)]
    limit = ctx.cfg.eval.max_read_chars
    n_cut = sum(len(r) > limit for r in raw)
    if n_cut:
        log.warning("[%s] %d generation(s) are longer than eval.max_read_chars=%d characters: "
                    "only their start is parsed and scored", method.name, n_cut, limit)
    return Selected(chosen, info, raw, n_cut)


@dataclass(frozen=True)
class Scored:
    predictions: list[Any]  # the task's parse of each chosen text
    scores: Scores


def parse_and_score(ctx: RunContext, method: Method, selected: Selected) -> Scored:
    """The task parses each chosen text and scores it against the gold output (function
    calling: executing every call), with the model-time values it names."""
    preds = [ctx.task.parse(r) for r in selected.raw]
    if any(s.target is None for s in ctx.samples):
        log.warning("[%s] the data has no gold outputs: predictions only, no metrics", method.name)
    values = model_values(ctx, preds) if ctx.task.model_values else None
    return Scored(preds, ctx.task.score(preds, ctx.samples, ctx.cfg.seed, values))


def model_values(ctx: RunContext, predictions: Sequence[Any]) -> dict[str, list[float | None]]:
    """What the task's ``model_values`` name, per prediction, on the run's model without
    steering or adapters: ``nll``, the mean per-token NLL of the prediction after the
    sample's zero-shot chat prompt (None for an empty prediction). Cached on disk by
    (model, prompt, prediction), so each text is scored once across methods and runs."""
    from fints_repro.models.chat import render_chat
    from fints_repro.steering.logprob import mean_token_nll

    unknown = sorted(set(ctx.task.model_values) - {"nll"})
    if unknown:
        raise ValueError(f"task {ctx.task.name!r} asks for model values {unknown}; known: ['nll']")
    lm = ctx.model(None)
    prompts = [render_chat(lm.tokenizer, s.input, lm.system_prompt) for s in ctx.samples]
    texts = [str(p).strip() for p in predictions]
    store = GenerationStore(Path(ctx.cfg.cache_dir) / "nll" / f"{content_hash([lm.fingerprint])}.jsonl")
    keys = [GenerationStore.key(f"{p}\0{t}") for p, t in zip(prompts, texts)]
    # one row per distinct (prompt, prediction) not yet scored
    todo = list({k: i for i, (k, t) in enumerate(zip(keys, texts))
                 if t and k not in store.items}.values())
    if todo:
        got = mean_token_nll(lm, [prompts[i] for i in todo], [texts[i] for i in todo],
                             batch_size=ctx.cfg.generation.batch_size)
        store.add([(keys[i], repr(v)) for i, v in zip(todo, got)])
    return {"nll": [float(store.items[k]) if t else None for k, t in zip(keys, texts)]}


# ------------------------------------------------------------------ write


@dataclass
class Timings:
    """Seconds per stage of one method (into its metrics as ``seconds_<stage>``)."""

    fit: float = 0.0
    prompts: float = 0.0
    steering_prep: float = 0.0
    generation: float = 0.0
    scoring: float = 0.0
    started: float = field(default_factory=time.time)

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + time.time() - t0)


def prediction_rows(ctx: RunContext, backbone: Backbone, prompts: Prompts,
                    plan: SteeringPlan | None, generated: Generated, selected: Selected,
                    scored: Scored) -> list[dict[str, Any]]:
    """One ``predictions.jsonl`` row per sample, in sample order."""
    rows = []
    for i, s in enumerate(ctx.samples):
        row = {"id": s.id, "user": s.user, "type": s.type, "prompt": prompts.texts[i],
               "generation": selected.raw[i], "prediction": scored.predictions[i],
               "target": s.target, "history_ids": prompts.prompts[i].history_ids,
               "scores": scored.scores.per_sample[i], "cache_key": generated.row_keys[i],
               "candidates": generated.candidates[i]}
        if backbone.n_candidates > 1 or selected.info[i]:
            row["selection"] = {"chosen": selected.chosen[i], **selected.info[i]}
        if plan:
            row["steering"] = {"steered": plan.steered[i], **(plan.row_info[i] if plan.row_info else {})}
        rows.append(row)
    return rows


def method_metrics(backbone: Backbone, prompts: Prompts, plan: SteeringPlan | None,
                   generated: Generated, selected: Selected, scored: Scored,
                   timings: Timings) -> dict[str, Any]:
    """What ``<method>/metrics.json`` holds: the task's aggregates, counts, the decoding
    that made the rows, seconds per stage, the backbone's and the plan's statistics."""
    total = max(time.time() - timings.started, 1e-9)
    n_gen, t_gen = generated.n_generated, timings.generation
    metrics = {
        **scored.scores.aggregate,
        "n_generated": n_gen,
        "n_cached": generated.n_cached,
        "n_prompts_truncated": prompts.n_truncated,
        "n_generations_cut": selected.n_cut,
        # what generated the rows, nulls resolved from the checkpoint (not a score column)
        "decoding": {k: getattr(prompts.params, k) for k in ("do_sample", "temperature", "top_p",
                                                             "max_new_tokens")},
        "seconds_fit": round(timings.fit, 3),
        "seconds_prompts": round(timings.prompts, 3),
        "seconds_steering_prep": round(timings.steering_prep, 3),
        "seconds_generation": round(t_gen, 3),
        # parsing and scoring (function calling: executing every call), and its share of
        # this method's time
        "seconds_scoring": round(timings.scoring, 3),
        "scoring_share": round(timings.scoring / total, 4),
        "samples_per_second": round(n_gen / t_gen, 3) if n_gen and t_gen > 0 else None,
        **backbone.metrics(),
    }
    if plan:
        metrics.update({f"steering_{k}": v for k, v in plan.stats.items()})
    return metrics


def write(out_dir: Path, method: Method, rows: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """The scored rows (replacing the generation-time appends) and the metrics."""
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows, f"{method.name}'s predictions")
    write_json_atomic(out_dir / "metrics.json", metrics, f"{method.name}'s metrics")


def method_dir(run_dir: Path, method: Method) -> Path:
    return make_dir(run_dir / method.name, f"the run's folder of method {method.name!r}")
