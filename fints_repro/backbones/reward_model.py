"""``backbone=reward_model``: best-of-N with a personalized reward, steering pluggable on top.

- **Candidates**: the base backbone (``backbone.reward_model.base``: zero_shot | rag, with
  ``backbone.k``) writes the prompts; the pipeline samples ``n`` candidates per row in one
  ``generate`` (``temperature``, ``top_p``), each cached by its candidate index. The
  generation model is the run's own, untouched, so a steering plan on top acts exactly as
  on the base backbone (its per-row vectors, N rows per sample).
- **Training data**: each user's contrastive pairs (chosen = the user's output, rejected =
  the generator's), made as the method's ``steering.pairs`` says and cached by
  ``build_pairs`` (``preferences.user_pairs``, the same pairs steering uses).
  The reward reads (question, answer) with the item's *task question*
  (``dataset.question_template``), at test time the sample's: the same text on both sides,
  whatever ``steering.pairs.extraction_prompt`` stores for extraction.
- **The selector** (``reward``), one module each: ``trained`` (``reward_trained.py``: a
  scalar reward model per user, LoRA + head, TRL's ``RewardTrainer``; the argmax, the
  first candidate for a user without pairs) and ``judge`` (``reward_judge.py``: the run's
  LLM with a persona per user, a pairwise knock-out).

``predictions.jsonl``: each row's ``candidates``, and under ``selection`` the ``chosen``
index and the ``rewards`` (N numbers; null for a user without a reward model; the judge:
the comparisons each candidate won).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import time
from typing import Any, Optional, Protocol, Sequence

from fints_repro.backbones.base import BACKBONES, Backbone, FitContext, Prompt, build_backbone
from fints_repro.backbones.reward_judge import JudgeReward
from fints_repro.backbones.reward_trained import TrainedReward, task_question
from fints_repro.checks import at_least, check_train, fail, has_placeholders, in_range, one_of, positive
from fints_repro.config import BackboneConfig, PairsConfig, TrainConfig
from fints_repro.data.schema import Sample
from fints_repro.preferences import PairSource, user_history, user_pairs
from fints_repro.registry import settings_of

NAME = "reward_model"
REWARD_BASES = ("zero_shot", "rag")
REWARDS = ("trained", "judge")


@dataclass
class RewardModelSettings:
    """``backbone.reward_model.*``: N sampled candidates from a base backbone, the one a
    personalized reward ranks highest is the prediction."""

    base: str = "rag"  # the backbone that writes the candidates: zero_shot | rag
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    # `trained`: a scalar reward model per user (Bradley-Terry on the user's contrastive
    # pairs, TRL's RewardTrainer); `judge`: the run's LLM as a pairwise judge with a persona
    # written from the user's pairs, knock-out over the candidates (the authors' runs).
    reward: str = "trained"
    # trained: the reward model's backbone; "" = the run's model with a scalar head, else
    # a model group option or a local path.
    encoder: str = ""
    # trained: one LoRA adapter per user on the encoder (and its scalar head trained whole),
    # so a user's reward model is small; target_modules null = PEFT's per-architecture
    # default (q_proj + v_proj; GPT-2: c_attn).
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    # lr 1e-4: a rate for a LoRA adapter and a new head (TRL's RewardConfig default).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-4, epochs=2.0, batch_size=4, weight_decay=0.0, warmup_ratio=0.1,
        max_grad_norm=1.0, max_length=1024))
    # trained: (question + candidate) sequences per forward when candidates are scored
    score_batch_size: int = 8
    # judge: decoding of its verdicts and persona
    judge_max_new_tokens: int = 8
    persona_max_new_tokens: int = 96
    persona_max_pairs: int = 8
    # judge: the persona prompt ({pairs}: up to persona_max_pairs of the user's pairs, each
    # by persona_pair_template with {question}, {chosen}, {rejected}, blank-line separated).
    persona_template: str = (
        "Here are examples of what one user wrote. For each task, the user preferred their own "
        "answer over an alternative.\n\n{pairs}\n\nDescribe this user's preferences and "
        "writing style in a few sentences, so that someone could tell which answer this user "
        "would prefer.")
    persona_pair_template: str = "Task: {question}\nPreferred: {chosen}\nNot preferred: {rejected}"
    # judge: one comparison ({persona}, {input}: the task input, {a}, {b}: the current winner
    # and the challenger); the verdict is the A or B its answer starts with.
    judge_template: str = (
        "Which of two answers would a specific user prefer?\n\nThe user:\n{persona}\n\n"
        "The task:\n{input}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer would this "
        "user prefer? Reply with one letter: A or B.")
    # judge: the persona of a user without pairs (a generic judge, as the authors' code).
    no_persona: str = "Nothing is known about this user."

    def check(self, key: str, backbone: BackboneConfig) -> None:
        one_of(f"{key}.base", self.base, REWARD_BASES)
        at_least(f"{key}.n", self.n, 1)
        positive(f"{key}.temperature", self.temperature)
        in_range(f"{key}.top_p", self.top_p, 0, 1, low_open=True)
        one_of(f"{key}.reward", self.reward, REWARDS)
        at_least(f"{key}.lora_r", self.lora_r, 1)
        positive(f"{key}.lora_alpha", self.lora_alpha)
        in_range(f"{key}.lora_dropout", self.lora_dropout, 0, 1)
        if self.target_modules is not None and not self.target_modules:
            fail(f"{key}.target_modules", [], "is empty (null = the architecture's default)")
        check_train(self.train, f"{key}.train")
        at_least(f"{key}.score_batch_size", self.score_batch_size, 1)
        at_least(f"{key}.judge_max_new_tokens", self.judge_max_new_tokens, 1)
        at_least(f"{key}.persona_max_new_tokens", self.persona_max_new_tokens, 1)
        at_least(f"{key}.persona_max_pairs", self.persona_max_pairs, 1)
        has_placeholders(f"{key}.persona_template", self.persona_template, ["pairs"])
        has_placeholders(f"{key}.judge_template", self.judge_template, ["persona", "input", "a", "b"])


def reward_pairs(pairs_cfg: PairsConfig, samples: Sequence[Sample], source: PairSource | None) -> dict:
    """{user: pairs}, each pair's question the item's task question (``task_question``)."""
    if source is None:
        raise RuntimeError("reward_model: pairs are to be made, and the fit context has no pair source")
    by_user = user_pairs(pairs_cfg, samples, source)
    items = {(u, h.id): h for u, hs in user_history(samples).items() for h in hs}
    if pairs_cfg.source == "train_samples" and source.pair_items:
        items.update({(u, h.id): h for u, hs in source.pair_items().items() for h in hs})

    def question(p) -> str:
        item = items.get((p.user, p.item_id))
        return task_question(item.input, source.dataset) if item is not None else p.prompt

    return {u: [dataclasses.replace(p, prompt=question(p)) for p in ps] for u, ps in by_user.items()}


class Selector(Protocol):
    """A reward: fitted on the users' pairs, then picks one candidate per row."""

    stats: dict[str, Any]

    def fit(self, lm, samples: Sequence[Sample], pairs: dict[str, list], ctx: FitContext) -> None: ...

    def select(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]
               ) -> tuple[list[int], list[dict[str, Any]]]: ...

    def close(self, lm) -> None: ...


SELECTORS = {"trained": TrainedReward, "judge": JudgeReward}


@BACKBONES.register(NAME, settings=RewardModelSettings)
class RewardModel(Backbone):
    name = NAME

    def __init__(self, cfg: BackboneConfig, task, retriever):
        super().__init__(cfg, task, retriever)
        self.rm: RewardModelSettings = settings_of(cfg, NAME, "backbone")
        self.rm.check(f"backbone.{NAME}", cfg)  # as at start-up, for a backbone built directly
        self.n_candidates = self.rm.n
        self.base = build_backbone(dataclasses.replace(cfg, name=self.rm.base), task, retriever)
        self.selector: Selector = SELECTORS[self.rm.reward](self.rm, task)
        self.pairs: dict[str, list] = {}
        self.stats: dict[str, Any] = {}

    def build_prompts(self, samples: Sequence[Sample]) -> list[Prompt]:
        return self.base.build_prompts(samples)

    def decoding(self, params):
        return dataclasses.replace(params, do_sample=True, temperature=self.rm.temperature,
                                   top_p=self.rm.top_p)

    def fit(self, lm, samples, ctx: FitContext, pairs: dict | None = None) -> None:
        """``pairs``: {user: pairs} made elsewhere (e.g. a held-out split of
        ``reward_pairs``); None: made here as the method's ``steering.pairs`` says."""
        self.pairs = pairs if pairs is not None else reward_pairs(ctx.pairs, samples, ctx.pair_source)
        self.stats = {"backbone_n_pairs": sum(len(v) for v in self.pairs.values())}
        self.selector.fit(lm, list(samples), self.pairs, ctx)

    def select(self, samples, candidates):
        t0 = time.time()
        out = self.selector.select(samples, candidates)
        self.stats["backbone_n_candidates"] = sum(len(c) for c in candidates)
        self.stats["seconds_selection"] = round(time.time() - t0, 3)
        return out

    def metrics(self) -> dict[str, Any]:
        return {**self.stats, **self.selector.stats}

    def close(self, lm) -> None:
        self.selector.close(lm)
        lm.model.eval()
