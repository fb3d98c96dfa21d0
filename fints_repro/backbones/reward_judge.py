"""``backbone.reward_model.reward=judge`` (what the authors ran, SynthesizeMe-style): the
run's LLM writes a persona of each user from up to ``persona_max_pairs`` of their pairs
(greedy), then judges pairwise: a knock-out over the N candidates, the current winner (A)
against the next challenger (B), N - 1 comparisons per row, one batched ``generate`` per
round over all rows of all users (``JudgeReward``). A tie or an unparseable verdict keeps
the current winner; two identical candidates are not judged; a user without pairs gets a
generic judge (``no_persona``), as in the authors' code. Personas and verdicts are cached
per prompt in ``<cache_dir>/judge/``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from fints_repro.backbones.base import FitContext
from fints_repro.data.schema import Sample
from fints_repro.errors import DataError
from fints_repro.models.engines import greedy_cached
from fints_repro.tasks.prompts import truncate_words
from fints_repro.text import WHITESPACE, pattern, search

if TYPE_CHECKING:
    from fints_repro.backbones.reward_model import RewardModelSettings
    from fints_repro.models.loading import LoadedModel
    from fints_repro.tasks import Task

log = logging.getLogger(__name__)

# The verdict: "A" or "B" (capital, a word of its own) at the start of the answer, after an
# optional "Answer:" / "The answer is" and quotes or brackets. Matched by RE2 (linear time
# on any text, where Python's re backtracks on long runs of spaces), whitespace as Python's.
_VERDICT = (r"^{w}*(?i:(?:the{w}+)?(?:better{w}+)?answer(?:{w}+is)?{w}*[:\-]?{w}*)?"
            r"[\"'*(\[]*([AB])(?:[^A-Za-z0-9]|$)").replace("{w}", WHITESPACE)


def parse_verdict(text: str) -> str | None:
    """"A", "B", or None (a tie, a refusal, anything else)."""
    m = search(pattern(_VERDICT, "the judge's verdict"), text)
    return m.group(1) if m else None


def knockout(candidates: Sequence[Sequence[str]],
             judge: Callable[[list[tuple[int, int, int]]], list[str]],
             ) -> tuple[list[int], list[list[int]], list[list[list]], dict[str, int]]:
    """A sequential knock-out over each row's candidates: candidate 0 is the first winner;
    round b (1 .. N-1) compares the current winner (A) with candidate b (B), for every row
    at once: ``judge([(row, a, b), ...])`` returns one verdict text per comparison. "B"
    makes B the winner; "A", a tie or an unparseable verdict keeps A (the latter counted).
    Two identical candidates are not judged (A stays).

    Returns the winner per row, the comparisons each candidate won, per row the
    comparisons as ``[a, b, verdict]`` (verdict "A" | "B" | None), and counts (``calls``,
    ``unparseable``, ``identical``)."""
    winner = [0] * len(candidates)
    wins = [[0] * len(c) for c in candidates]
    log_rows: list[list[list]] = [[] for _ in candidates]
    counts = {"calls": 0, "unparseable": 0, "identical": 0}
    for b in range(1, max((len(c) for c in candidates), default=0)):
        asks = []
        for i, c in enumerate(candidates):
            if b >= len(c):
                continue
            if c[winner[i]].strip() == c[b].strip():
                counts["identical"] += 1
                continue
            asks.append((i, winner[i], b))
        if not asks:
            continue
        verdicts = judge(asks)
        counts["calls"] += len(asks)
        for (i, a, b_), text in zip(asks, verdicts):
            v = parse_verdict(text)
            if v == "B":
                winner[i] = b_
                wins[i][b_] += 1
            elif v == "A":
                wins[i][a] += 1
            else:
                counts["unparseable"] += 1
            log_rows[i].append([a, b_, v])
    return winner, wins, log_rows, counts


class JudgeReward:
    """Writes a persona per user with pairs at fit; selects by the knock-out."""

    def __init__(self, rm: "RewardModelSettings", task: "Task"):
        self.rm, self.task = rm, task
        self.lm: "LoadedModel | None" = None
        self.ctx: FitContext | None = None
        self.personas: dict[str, str] = {}
        self.stats: dict[str, Any] = {}

    def generate(self, user_texts: Sequence[str], max_new_tokens: int, desc: str,
                 describe: Callable[[int, int], Exception]) -> list[str]:
        """Greedy generations of the run's LLM for chat-rendered ``user_texts``, batched
        (``generation.batch_size``) and cached per prompt in ``<cache_dir>/judge/``."""
        ctx = self.ctx
        out, n_new = greedy_cached(self.lm, user_texts, max_new_tokens,
                                   store_dir=Path(ctx.cache_dir) / "judge", seed=ctx.seed,
                                   batch_size=ctx.batch_size, overlength=ctx.overlength,
                                   progress=ctx.progress, desc=desc, describe=describe)
        self.stats[f"backbone_{desc}_generated"] = self.stats.get(f"backbone_{desc}_generated", 0) + n_new
        return out

    def persona_prompt(self, pairs: Sequence) -> str:
        """Up to ``persona_max_pairs`` of the user's pairs (first attempts first, then in
        item order), each by ``persona_pair_template``, in ``persona_template``."""
        words = self.task.dataset.history_max_words
        order = sorted(range(len(pairs)), key=lambda j: (pairs[j].attempt, j))
        shown = sorted(order[:self.rm.persona_max_pairs])
        return self.rm.persona_template.format(pairs="\n\n".join(
            self.rm.persona_pair_template.format(question=truncate_words(pairs[j].prompt, words),
                                                 chosen=pairs[j].chosen, rejected=pairs[j].rejected)
            for j in shown))

    def fit(self, lm, samples: Sequence[Sample], pairs: dict[str, list], ctx: FitContext) -> None:
        self.lm, self.ctx = lm, ctx
        t0 = time.time()
        users = sorted({s.user for s in samples})
        with_pairs = [u for u in users if pairs.get(u)]
        prompts = [self.persona_prompt(pairs[u]) for u in with_pairs]

        def too_long(i: int, n: int) -> Exception:
            return DataError(f"reward_model: the persona prompt of user {with_pairs[i]!r} has {n} "
                             "tokens, more than the model's context with persona_max_new_tokens; "
                             "set generation.overlength=truncate or lower "
                             "backbone.reward_model.persona_max_pairs", record=with_pairs[i])

        self.stats["backbone_personas_generated"] = 0
        written = (self.generate(prompts, self.rm.persona_max_new_tokens, "personas", too_long)
                   if prompts else [])
        self.personas = {u: p.strip() for u, p in zip(with_pairs, written)}
        self.stats.update({"backbone_n_personas": len(with_pairs),
                           "backbone_n_users_without_persona": len(users) - len(with_pairs),
                           "seconds_personas": round(time.time() - t0, 3)})

    def persona(self, user: str) -> str:
        return self.personas.get(user) or self.rm.no_persona

    def select(self, samples, candidates) -> tuple[list[int], list[dict[str, Any]]]:
        texts = [[self.task.reward_text(c) for c in cands] for cands in candidates]

        def judge(asks: list[tuple[int, int, int]]) -> list[str]:
            prompts = [self.rm.judge_template.format(persona=self.persona(samples[i].user),
                                                     input=samples[i].input, a=texts[i][a],
                                                     b=texts[i][b]) for i, a, b in asks]

            def too_long(j: int, n: int) -> Exception:
                s = samples[asks[j][0]]
                return DataError(f"reward_model: a judge prompt of sample {s.id!r} (user {s.user!r}) "
                                 f"has {n} tokens, more than the model's context with "
                                 "judge_max_new_tokens; set generation.overlength=truncate",
                                 record=s.id)

            return self.generate(prompts, self.rm.judge_max_new_tokens, "judge", too_long)

        t0 = time.time()
        self.stats.setdefault("backbone_judge_generated", 0)
        chosen, wins, comparisons, counts = knockout(texts, judge)
        self.stats.update({"backbone_judge_calls": counts["calls"],
                           "backbone_judge_unparseable": counts["unparseable"],
                           "backbone_judge_identical_skipped": counts["identical"],
                           "seconds_judge": round(time.time() - t0, 3)})
        if counts["unparseable"]:
            log.warning("reward_model: %d of %d judge verdicts were neither A nor B (the current "
                        "winner kept)", counts["unparseable"], counts["calls"])
        info = [{"rewards": w, "comparisons": c} for w, c in zip(wins, comparisons)]
        return chosen, info

    def close(self, lm) -> None:
        self.lm = None
