"""Contrastive pairs (REFERENCE.md §1.2), as the authors' ``data_collect`` script builds them.

For each history item of each user, and each attempt: the generator is prompted with k
random history items of *other* users followed by the item's task question; its answer is
the ``rejected`` side and the user's own output the ``chosen`` side. An attempt is kept when
ROUGE-L F(rejected, chosen) < the dataset's threshold (all passing attempts are kept).

Each attempt draws its other-user items from its own ``random.Random`` seeded with
``seed|user|item|attempt``, so prompts do not depend on iteration order. All prompts go
through one batched ``generate_batches`` call, cached per prompt in a ``GenerationStore``:
a rerun generates nothing and a killed run resumes with the missing prompts only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from rouge_score import rouge_scorer

from fints_repro.backbones.prompting import truncate_words
from fints_repro.cache import GenerationStore, content_hash
from fints_repro.config import DatasetConfig, PairsConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError
from fints_repro.generation import DecodingParams, generate_batches
from fints_repro.models.chat import render_chat
from fints_repro.models.loading import LoadedModel

log = logging.getLogger(__name__)

QUESTION_MODES = ("task", "generation_prompt")


@dataclass(frozen=True)
class Pair:
    user: str
    item_id: str
    question: str  # what the answers are appended to for extraction and retrieval
    chosen: str  # the user's own output for the history item
    rejected: str  # the generator's output
    rouge_l: float  # ROUGE-L F(rejected, chosen), LaMP convention (rouge_score, no stemmer)
    attempt: int


@dataclass(frozen=True)
class _Attempt:
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


def generator_prompt(others: Sequence[HistoryItem], item: HistoryItem, dataset: DatasetConfig) -> str:
    """The generator's user turn: other users' items as ``Historical sample`` lines (their
    inputs cut to ``dataset.history_max_words`` like RAG prompts), then the item's task
    question (the authors' ``build_rag_instruction`` with ``rag=others``)."""
    lines = [
        f"Historical sample {i}:\n Q: "
        f"{dataset.question_template.format(input=truncate_words(o.input, dataset.history_max_words))}"
        f". \n A: {o.output}."
        for i, o in enumerate(others)
    ]
    return "\n".join(lines) + "\n\n" + dataset.question_template.format(input=item.input)


def _draw_others(
    rng: random.Random, others: Sequence[str], history: dict[str, list[HistoryItem]], k: int
) -> list[HistoryItem]:
    """k items of other users, with replacement: a random user, then a random item of theirs."""
    return [rng.choice(history[rng.choice(others)]) for _ in range(k)]


def _plan_attempts(
    history: dict[str, list[HistoryItem]], dataset: DatasetConfig, k: int, attempts: int, seed: int
) -> list[_Attempt]:
    with_history = [u for u, items in history.items() if items]
    plan: list[_Attempt] = []
    stranded = []
    for user, items in history.items():
        others = [u for u in with_history if u != user]
        if items and not others:
            stranded.append(user)
            continue
        for item in items:
            if not item.output.strip():  # no chosen side: nothing to contrast
                continue
            for a in range(attempts):
                rng = random.Random(f"{seed}|{user}|{item.id}|{a}")
                prompt = generator_prompt(_draw_others(rng, others, history, k), item, dataset)
                plan.append(_Attempt(user, item, a, prompt))
    if stranded:
        log.warning("pairs: no other user has history for %d user(s) (%s): they get no pairs",
                    len(stranded), ", ".join(stranded[:5]) + (" ..." if len(stranded) > 5 else ""))
    return plan


def _generate_cached(
    lm: LoadedModel, texts: Sequence[str], params: DecodingParams, batch_size: int,
    cache_dir: str | Path, progress: bool,
) -> list[str]:
    """Generations for the distinct ``texts``, through the pair-generation store."""
    key = content_hash([lm.fingerprint, asdict(params), batch_size])
    store = GenerationStore(Path(cache_dir) / "pairs" / f"{key}.jsonl")
    keys = [store.key(t) for t in texts]
    done = {i: store.items[k] for i, k in enumerate(keys) if k in store.items}
    log.info("pairs: %d/%d generations reused from %s", len(done), len(texts), store.path)
    for idx, gens in generate_batches(lm, texts, params, batch_size=batch_size, sort_by_length=True,
                                      skip=set(done), progress=progress, desc="pairs"):
        store.add([(keys[i], g) for i, g in zip(idx, gens)])
        done.update(zip(idx, gens))
    return [done[i] for i in range(len(texts))]


def build_pairs(
    samples: Sequence[Sample],
    lm: LoadedModel,
    dataset: DatasetConfig,
    cfg: PairsConfig,
    *,
    cache_dir: str | Path,
    seed: int,
    progress: bool = True,
) -> dict[str, list[Pair]]:
    """{user: pairs} for every user of ``samples`` (``[]`` where none was kept), pairs in
    history order, then attempt order. ``lm`` is the generator (``cfg.generator`` or the
    run's own model, as the caller resolves it)."""
    if cfg.question not in QUESTION_MODES:
        raise ConfigError(f"steering.pairs.question={cfg.question!r}: expected one of {QUESTION_MODES}")
    k = cfg.k_other if cfg.k_other is not None else dataset.pair_k_other
    if k < 1:
        raise ConfigError(f"pairs: k_other must be >= 1, got {k}")
    history = user_history(samples)
    plan = _plan_attempts(history, dataset, k, cfg.attempts, seed)
    out: dict[str, list[Pair]] = {u: [] for u in history}
    if not plan:
        return out

    params = DecodingParams(max_new_tokens=dataset.max_new_tokens, do_sample=cfg.do_sample,
                            temperature=cfg.temperature, top_p=1.0, seed=seed)
    # Identical prompts (possible when few other items exist) are generated once.
    prompts = list(dict.fromkeys(p.prompt for p in plan))
    texts = [render_chat(lm.tokenizer, p, lm.system_prompt) for p in prompts]
    generation = dict(zip(prompts, _generate_cached(lm, texts, params, cfg.batch_size,
                                                    cache_dir, progress)))

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for p in plan:
        rejected = generation[p.prompt].strip()
        if not rejected:
            continue
        chosen = p.item.output
        score = scorer.score(chosen, rejected)["rougeL"].fmeasure
        if score < dataset.pair_rouge_threshold:
            question = (dataset.question_template.format(input=p.item.input)
                        if cfg.question == "task" else p.prompt)
            out[p.user].append(Pair(p.user, p.item.id, question, chosen, rejected, score, p.attempt))
    return out


def pair_stats(pairs: dict[str, list[Pair]]) -> dict[str, Any]:
    """Counts for logging: users, pairs, users left without pairs, mean ROUGE-L of the kept."""
    scores = [p.rouge_l for ps in pairs.values() for p in ps]
    return {
        "n_users": len(pairs),
        "n_pairs": len(scores),
        "n_users_without_pairs": sum(1 for ps in pairs.values() if not ps),
        "mean_rouge_l": sum(scores) / len(scores) if scores else None,
    }
