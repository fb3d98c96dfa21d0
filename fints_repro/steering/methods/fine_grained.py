"""Fints fine-grained, instance-tailored steering (docs/fidelity.md).

Settings in ``steering.fine_grained`` (``FineGrainedSettings``). For each test input: the
top-K of its user's pairs by the run's retriever (query = the
input without its instruction prefix; documents = question + chosen), combined with equal
weights (``mean``) or ``softmax(score / temperature)``; then ``alpha * v_attn`` is added to the
attention output and ``beta * v_mlp`` to the MLP output of the same layer ("pulse and
re-pulse"), at every position. K larger than a user's pairs is clipped (logged).
``steering.fine_grained.key_by_question`` (the authors' PerSteer.py keeps a user's vectors in
a dict keyed by question): pairs with the same question steer with the last one's vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fints_repro.checks import at_least, one_of, positive
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.models.loading import LoadedModel
from fints_repro.registry import settings_of
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.steering.methods.common import PairVectors, plan_stats, prepare, strength
from fints_repro.steering.sites import hidden_size

log = logging.getLogger(__name__)

NAME = "fine_grained"
AGGREGATES = ("mean", "softmax")


@dataclass
class FineGrainedSettings:
    """``steering.fine_grained.*`` (Fints): per test input, the top-K of its user's pairs."""

    top_k: int = 5
    aggregate: str = "mean"  # mean | softmax (weights softmax(score / temperature))
    temperature: float = 0.1
    # The retriever (a `retriever` group option) that ranks a user's pairs for an input;
    # null = the run's. The authors rank with Contriever (mean pooling, dot product).
    retriever: Optional[str] = None
    # The authors' PerSteer.py stores a user's vectors in a dict keyed by the pair's
    # question: pairs with the same question (two attempts of one PersonalWAB task) share
    # the vectors of the last of them. false (ours): each pair its own.
    key_by_question: bool = False

    def check(self, key: str, steering: SteeringConfig) -> None:
        at_least(f"{key}.top_k", self.top_k, 1)
        one_of(f"{key}.aggregate", self.aggregate, AGGREGATES)
        positive(f"{key}.temperature", self.temperature)


def pair_weights(scores: Sequence[float], aggregate: str, temperature: float) -> torch.Tensor:
    s = torch.tensor(scores, dtype=torch.float64)
    if aggregate == "mean":
        return torch.full_like(s, 1.0 / len(s))
    return torch.softmax(s / temperature, dim=0)


def vector_rows(pv: PairVectors, key_by_question: bool) -> list[int]:
    """For each pair, the row of the vectors it is steered with: its own, or, keyed by
    question (the authors' dict), the last pair of its user with the same question."""
    rows = list(range(len(pv.pairs)))
    if key_by_question:
        for user_rows in pv.rows.values():
            last = {pv.pairs[j].prompt: j for j in user_rows}
            for j in user_rows:
                rows[j] = last[pv.pairs[j].prompt]
    return rows


@STEERING.register(NAME, settings=FineGrainedSettings)
def fine_grained(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
                 inputs: SteeringInputs, chosen_weights=None,
                 pv: PairVectors | None = None) -> SteeringPlan:
    """``chosen_weights(pairs)``: per pair, weights over the chosen side's answer tokens
    (SteerX); ``pv``: pairs and pair vectors made elsewhere; None: made here."""
    own: FineGrainedSettings = settings_of(cfg, NAME, "steering")
    pv = pv if pv is not None else prepare(cfg, lm, samples, inputs, chosen_weights=chosen_weights)
    rows = [i for i, s in enumerate(samples) if pv.rows.get(s.user)]
    retriever = inputs.retriever(own.retriever) if own.retriever else inputs.retriever()
    rankings = retriever.rank_many(
        [inputs.task.retrieval_query(samples[i]) for i in rows],
        [[f"{pv.pairs[j].prompt} {pv.pairs[j].chosen}" for j in pv.rows[samples[i].user]]
         for i in rows],
        own.top_k,
    ) if rows else []
    clipped = sum(1 for i in rows if len(pv.rows[samples[i].user]) < own.top_k)
    if clipped:
        log.warning("steering.fine_grained.top_k=%d is more than the pairs of the user for %d of "
                    "%d samples: those use all their user's pairs", own.top_k, clipped, len(rows))
    H = hidden_size(lm.model)
    vectors = {(pv.layer, s): torch.zeros((len(samples), H)) for s in cfg.sites}
    info: list[dict] = [{"pairs": [], "weights": []} for _ in samples]
    source = vector_rows(pv, own.key_by_question)
    for i, ranking in zip(rows, rankings):
        user_rows = pv.rows[samples[i].user]
        picked = [user_rows[j] for j, _ in ranking]
        w = pair_weights([score for _, score in ranking], own.aggregate, own.temperature).to(torch.float32)
        for site in cfg.sites:
            vectors[(pv.layer, site)][i] = strength(cfg, site) * (
                w @ pv.vectors[site][[source[j] for j in picked]])
        info[i] = {"pairs": [f"{pv.pairs[j].item_id}#{pv.pairs[j].attempt}" for j in picked],
                   "weights": [round(float(x), 6) for x in w]}
    steered = [bool(pv.rows.get(s.user)) for s in samples]
    stats = {**plan_stats(pv, steered), "n_samples_k_clipped": clipped}
    return SteeringPlan(vectors, steered, cfg.positions, inputs.layers_path, stats, info)
