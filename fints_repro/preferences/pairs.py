"""Contrastive pairs, as the authors' ``data_collect_para.py`` builds them (docs/fidelity.md:
"Fidelity to the authors' code").

For each item of each user, and each attempt: the generator is prompted with k random
items of *other* users and the item's task question; its answer is the ``rejected`` side
and the user's own output the ``chosen`` side. An attempt is kept when ROUGE-L
F(rejected, chosen) < the dataset's threshold (all passing attempts are kept).

The items are the users' profile (history) items by default, or any items the caller
passes (``items_by_user``: the authors use the users' training-split samples). Two prompt
layouts (``steering.pairs.prompt_layout``):

- ``compact`` (ours): the other users' items as ``Historical sample i`` lines (inputs cut
  to ``dataset.history_max_words``), a blank line, the item's question; the stripped answer;
- ``authors`` (their ``build_rag_instruction`` with ``form=python``): the item's task
  input, "For your reference, here are the user's past QA pairs:", the other users' items
  untruncated, and an instruction to answer as ``print("...")``
  (``dataset.pair_prompt_template``); only the quoted text is kept
  (``dataset.pair_answer_regex``) and an answer without it gives no pair.

Each attempt draws its other-user items from its own ``random.Random`` seeded with
``seed|user|item|attempt``, so prompts do not depend on iteration order. All prompts go
through the model's engine (``models.engines.generate_cached``), cached per prompt in a ``GenerationStore``:
a rerun generates nothing and a killed run resumes with the missing prompts only.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence


from fints_repro.config import DatasetConfig, PairsConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError, DataError
from fints_repro.models.chat import clip_chat_prompts
from fints_repro.models.engines import generate_cached
from fints_repro.models.generation import DecodingParams
from fints_repro.models.inspect import shape_of
from fints_repro.models.loading import LoadedModel
from fints_repro.tasks.prompts import item_question

if TYPE_CHECKING:
    from fints_repro.tasks import Task

log = logging.getLogger(__name__)

EXTRACTION_PROMPTS = ("task", "generation_prompt", "task_text")
PROMPT_LAYOUTS = ("compact", "authors")
ROUGE_IMPLS = ("rouge_score", "rouge")
SOURCES = ("profile", "train_samples")


@dataclass(kw_only=True)
class PairSource:
    """What making a run's pairs needs besides its samples (a steering method's inputs
    extend it)."""

    dataset: DatasetConfig
    task: "Task"  # the pair generator's prompt, how its answer is read, the pair criterion
    cache_dir: str
    seed: int
    generator: Callable[[], LoadedModel]  # writes the rejected side of the pairs
    progress: bool = True
    # steering.pairs.source=train_samples: the items pairs are made from, per user (the
    # users' training-split samples); None = their profile items.
    pair_items: Optional[Callable[[], dict[str, list[HistoryItem]]]] = None
    # generation.overlength: a generator prompt longer than the generator's context is an
    # error (naming it) or is cut in its middle
    overlength: str = "error"
    # Every evaluated sample of the experiment, when a run holds only a part of its users
    # (shard.count > 1): the other users whose items go into a generator prompt are drawn
    # from all of them, as in the whole run. Empty: the samples given.
    all_samples: Sequence[Sample] = ()


@dataclass(frozen=True)
class Pair:
    user: str
    item_id: str
    # what the answers are appended to for extraction and retrieval
    # (steering.pairs.extraction_prompt)
    prompt: str
    chosen: str  # the user's own output for the history item
    rejected: str  # the generator's output
    score: float  # what the task judged the pair by (text: ROUGE-L F(rejected, chosen))
    attempt: int


class UserPairs(dict):
    """``{user: [Pair, ...]}`` with what the attempts came to: ``attempts[user]`` (the
    generator prompts made for the user's items), and ``outcomes`` over all users:
    ``kept``, ``no_answer`` (the generation held no answer: empty, or no match of
    ``dataset.pair_answer_regex`` in the authors' layout), ``filtered`` (the task's
    criterion turned it down: ROUGE-L at or above the threshold; a right call scoring
    above the thresholds) and ``unscorable`` (the criterion could not score it: the
    `rouge` package's failures)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attempts: dict[str, int] = {u: 0 for u in self}
        self.outcomes: Counter = Counter()


@dataclass(frozen=True)
class Attempt:
    """One generation of the rejected side: a user's item, its attempt number and the
    generator prompt (other users' items drawn for it)."""

    user: str
    item: HistoryItem
    attempt: int
    prompt: str  # the generator's user turn (before the chat template)


def user_history(samples: Sequence[Sample]) -> dict[str, list[HistoryItem]]:
    """Each user's history items: the union over the user's samples, deduplicated by item
    id in first-seen order; users sorted (a user without history maps to [])."""
    seen: dict[str, dict[str, HistoryItem]] = {}
    for s in samples:
        items = seen.setdefault(s.user, {})
        for h in s.history:
            items.setdefault(h.id, h)
    return {u: list(seen[u].values()) for u in sorted(seen)}


def _draw_others(
    rng: random.Random, others: Sequence[str], history: Mapping[str, Sequence[HistoryItem]], k: int
) -> list[HistoryItem]:
    """k items of other users, with replacement: a random user, then a random item of theirs."""
    return [rng.choice(history[rng.choice(others)]) for _ in range(k)]


def _plan_attempts(
    history: dict[str, list[HistoryItem]], users: Sequence[str], k: int, attempts: int,
    seed: int, layout: str, task: "Task", pool: Mapping[str, Sequence[HistoryItem]],
) -> list[Attempt]:
    """Attempts for the items of ``users``; other users' items are drawn from ``pool``
    (the task's ``pair_pool``: by default ``history`` itself)."""
    with_pool = [u for u, items in pool.items() if items]
    plan: list[Attempt] = []
    stranded = []
    for user in users:
        items = history[user]
        others = [u for u in with_pool if u != user]
        if items and not others:
            stranded.append(user)
            continue
        for item in items:
            if not item.output.strip():  # no chosen side: nothing to contrast
                continue
            for a in range(attempts):
                rng = random.Random(f"{seed}|{user}|{item.id}|{a}")
                prompt = task.pair_prompt(_draw_others(rng, others, pool, k), item, layout)
                plan.append(Attempt(user, item, a, prompt))
    if stranded:
        log.warning("pairs: no other user has history for %d user(s) (%s): they get no pairs",
                    len(stranded), ", ".join(stranded[:5]) + (" ..." if len(stranded) > 5 else ""))
    return plan


def _check(cfg: PairsConfig, items_by_user) -> None:
    for name, allowed in (("extraction_prompt", EXTRACTION_PROMPTS), ("prompt_layout", PROMPT_LAYOUTS),
                          ("rouge_impl", ROUGE_IMPLS), ("source", SOURCES)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"steering.pairs.{name}={getattr(cfg, name)!r}: expected one of {allowed}")
    if cfg.source == "train_samples" and items_by_user is None:
        raise ConfigError("steering.pairs.source=train_samples: pairs are made from the users' "
                          "training-split items, and none were given (items_by_user)")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ConfigError(f"steering.pairs.max_new_tokens={cfg.max_new_tokens}: must be >= 1")


def _default_task(dataset: DatasetConfig, seed: int) -> "Task":
    from fints_repro.config import EvalConfig, GenerationConfig
    from fints_repro.tasks import build_task

    return build_task(dataset, GenerationConfig(), EvalConfig(), seed)


def pair_attempts(
    samples: Sequence[Sample], dataset: DatasetConfig, cfg: PairsConfig, *, seed: int,
    items_by_user: Mapping[str, Sequence[HistoryItem]] | None = None,
    task: "Task | None" = None, pool: Sequence[Sample] = (),
) -> list[Attempt]:
    """The generator prompts ``build_pairs`` runs (arguments as there), in order, without
    a model: one per item and attempt of each user of ``samples``. What a plan counts."""
    _check(cfg, items_by_user)
    k = cfg.k_other if cfg.k_other is not None else dataset.pair_k_other
    if k < 1:
        raise ConfigError(f"pairs: k_other must be >= 1, got {k}")
    users = sorted({s.user for s in samples})
    if items_by_user is None:
        history = user_history(pool or samples)
    else:
        history = {u: list(items_by_user.get(u, ())) for u in sorted(set(items_by_user) | set(users))}
    task = task if task is not None else _default_task(dataset, seed)
    return _plan_attempts(history, users, k, cfg.attempts, seed, cfg.prompt_layout, task,
                          task.pair_pool(history))


def build_pairs(
    samples: Sequence[Sample],
    lm: LoadedModel,
    dataset: DatasetConfig,
    cfg: PairsConfig,
    *,
    cache_dir: str | Path,
    seed: int,
    progress: bool = True,
    items_by_user: Mapping[str, Sequence[HistoryItem]] | None = None,
    task: "Task | None" = None,
    overlength: str = "error",
    pool: Sequence[Sample] = (),
) -> dict[str, list[Pair]]:
    """{user: pairs} for every user of ``samples`` (``[]`` where none was kept), pairs in
    item order, then attempt order. ``lm`` is the generator (``cfg.generator`` or the
    run's own model, as the caller resolves it).

    ``items_by_user``: the items pairs are made from, per user (``cfg.source=train_samples``:
    the users' training-split samples); default (None) the history items of the users'
    samples. Pairs are made for the users of ``samples``; the other users' items in the
    prompts are drawn from every user of ``items_by_user`` (or of ``pool``, the whole
    experiment's samples when ``samples`` are a part of it, else of ``samples``).
    ``task``: its ``accept_pair`` keeps or drops each attempt (default: the text task of
    ``dataset``, ROUGE-L below ``dataset.pair_rouge_threshold``).
    ``overlength`` (the run's ``generation.overlength``): a generator prompt longer than
    the generator's context stops the run naming the item (``error``) or is cut in its
    middle (``truncate``)."""
    users = sorted({s.user for s in samples})
    task = task if task is not None else _default_task(dataset, seed)
    plan = pair_attempts(samples, dataset, cfg, seed=seed, items_by_user=items_by_user,
                         task=task, pool=pool)
    out = UserPairs({u: [] for u in users})
    for p in plan:
        out.attempts[p.user] += 1
    if not plan:
        return out

    generation = _generate_rejected(plan, lm, dataset, cfg, cache_dir=cache_dir, seed=seed,
                                    progress=progress, overlength=overlength,
                                    max_read_chars=task.evaluation.max_read_chars)
    _keep_pairs(plan, generation, task, dataset, cfg, out)
    if not out.outcomes["kept"]:
        log.warning("pairs: none of the %d attempts gave a pair: %d generation(s) held no answer "
                    "(%s), the task's criterion turned %d down (text: ROUGE-L against the "
                    "user's output at or above dataset.pair_rouge_threshold), %d could not be "
                    "scored", len(plan), out.outcomes["no_answer"],
                    f"no match of dataset.pair_answer_regex={dataset.pair_answer_regex!r}"
                    if cfg.prompt_layout == "authors" and dataset.pair_answer_regex else "empty",
                    out.outcomes["filtered"], out.outcomes["unscorable"])
    return out


def _generate_rejected(plan: Sequence[Attempt], lm: LoadedModel, dataset: DatasetConfig,
                       cfg: PairsConfig, *, cache_dir: str | Path, seed: int, progress: bool,
                       overlength: str, max_read_chars: int) -> dict[str, str]:
    """{generator prompt: the generator's text}, each distinct prompt generated once (cached
    by content hash), prompts fitted to the generator's context first."""
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else dataset.max_new_tokens
    params = DecodingParams(max_new_tokens=max_new, do_sample=cfg.do_sample,
                            temperature=cfg.temperature, top_p=1.0, seed=seed)
    # Identical prompts (possible when few other items exist) are generated once.
    prompts = list(dict.fromkeys(p.prompt for p in plan))
    first = {}
    for p in plan:
        first.setdefault(p.prompt, p)

    def too_long(i: int, n: int) -> Exception:
        a = first[prompts[i]]
        return DataError(
            f"pairs: the generator prompt for item {a.item.id!r} of user {a.user!r} has {n} "
            f"tokens; with {max_new} new tokens it exceeds the generator's context of {limit}. "
            "Set generation.overlength=truncate to cut such prompts in the middle, or shorten "
            "them (steering.pairs.k_other, steering.pairs.max_new_tokens).", record=a.item.id)

    limit = shape_of(lm.model).max_positions
    texts, over = clip_chat_prompts(lm.tokenizer, prompts, lm.system_prompt, limit, max_new,
                                    overlength, too_long)
    if over:
        log.warning("pairs: %d generator prompt(s) longer than the context (%d tokens with %d "
                    "new) were cut in the middle", len(over), limit, max_new)
    # through the model's engine (unsteered: vLLM's under engine=vllm)
    generated, _ = generate_cached(lm, texts, params, batch_size=cfg.batch_size, progress=progress,
                                   desc="pairs",
                                   store_path=lambda key: Path(cache_dir) / "pairs" / f"{key}.jsonl")
    generation = dict(zip(prompts, generated))
    n_cut = sum(len(g) > max_read_chars for g in generation.values())
    if n_cut:
        log.warning("pairs: %d generation(s) are longer than eval.max_read_chars=%d characters: "
                    "only their start is read", n_cut, max_read_chars)
    return generation


def extraction_question(attempt: Attempt, cfg: PairsConfig, dataset: DatasetConfig,
                        task: "Task") -> str:
    """The text an attempt's pair answers are appended to (``steering.pairs.extraction_prompt``)."""
    if cfg.extraction_prompt == "task":
        return item_question(attempt.item, dataset, cfg.prompt_layout)
    if cfg.extraction_prompt == "task_text":
        return task.task_text(attempt.item)
    return attempt.prompt


def _keep_pairs(plan: Sequence[Attempt], generation: Mapping[str, str], task: "Task",
                dataset: DatasetConfig, cfg: PairsConfig, out: UserPairs) -> None:
    """Reads each attempt's answer (no answer: counted), lets the task's criterion keep or
    drop it, and appends the kept pairs to ``out`` with the outcome counts."""
    layout = cfg.prompt_layout
    answered = []
    for p in plan:
        rejected = task.pair_answer(generation[p.prompt], layout)
        if rejected.strip():
            answered.append((p, rejected))
        else:
            out.outcomes["no_answer"] += 1
    verdicts = task.accept_pairs([(p.item.output, r, p.item) for p, r in answered], cfg)
    for (p, rejected), verdict in zip(answered, verdicts):
        if verdict.keep:
            prompt = extraction_question(p, cfg, dataset, task)
            chosen, rejected = task.pair_sides(p.item.output, rejected, cfg)
            out[p.user].append(Pair(p.user, p.item.id, prompt, chosen, rejected,
                                    verdict.score, p.attempt))
            out.outcomes["kept"] += 1
        else:
            out.outcomes["unscorable" if math.isnan(verdict.score) else "filtered"] += 1


def pair_stats(pairs: dict[str, list[Pair]]) -> dict[str, Any]:
    """Counts for logging: users, pairs, users left without pairs, the mean score of the kept
    (text tasks: ROUGE-L F)."""
    scores = [p.score for ps in pairs.values() for p in ps]
    return {
        "n_users": len(pairs),
        "n_pairs": len(scores),
        "n_users_without_pairs": sum(1 for ps in pairs.values() if not ps),
        "mean_score": sum(scores) / len(scores) if scores else None,
    }


def attempt_stats(pairs: dict[str, list[Pair]]) -> dict[str, Any]:
    """What metrics.json says of the pair attempts (``UserPairs``): per user the attempts
    and the pairs kept, and the outcomes over all users."""
    attempts = getattr(pairs, "attempts", {})
    return {"pair_attempts": sum(attempts.values()),
            "pair_attempts_per_user": dict(sorted(attempts.items())),
            "pairs_per_user": {u: len(ps) for u, ps in sorted(pairs.items())},
            "pair_outcomes": dict(getattr(pairs, "outcomes", {}))}


def _pair_items(cfg: PairsConfig, samples: Sequence[Sample], source: PairSource
                ) -> dict[str, list[HistoryItem]] | None:
    """The items pairs are made from, per user (None: the samples' profile items)."""
    if cfg.source != "train_samples" or not source.pair_items:
        return None
    # the run's users only: the other users' items in a generator prompt come from the
    # sampled users, as in the authors' code, not from every user of the split (all of
    # the experiment's when this run holds a part of its users)
    users = {s.user for s in (source.all_samples or samples)}
    return {u: v for u, v in source.pair_items().items() if u in users}


def user_pair_attempts(cfg: PairsConfig, samples: Sequence[Sample], source: PairSource
                       ) -> list[Attempt]:
    """The generator prompts ``user_pairs`` would run, without running them (no model)."""
    return pair_attempts(samples, source.dataset, cfg, seed=source.seed, task=source.task,
                         items_by_user=_pair_items(cfg, samples, source), pool=source.all_samples)


def user_pairs(cfg: PairsConfig, samples: Sequence[Sample], source: PairSource
               ) -> dict[str, list[Pair]]:
    """{user: contrastive pairs} for the users of ``samples``, as ``cfg`` (the run's
    ``steering.pairs``) says they are made (from the profile items, or the users'
    training-split items), by the generator of ``source``; cached by ``build_pairs``. What
    steering methods extract vectors from and what a reward-model backbone trains on."""
    by_user = build_pairs(samples, source.generator(), source.dataset, cfg,
                          items_by_user=_pair_items(cfg, samples, source),
                          task=source.task, overlength=source.overlength,
                          cache_dir=source.cache_dir, seed=source.seed, progress=source.progress,
                          pool=source.all_samples)
    log.info("contrastive pairs: %s", pair_stats(by_user))
    return by_user
