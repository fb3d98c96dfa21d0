"""What every pair-based method shares: validate the config against the model, build (or
load) the contrastive pairs, extract (or load) one vector per pair at the steered layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fints_repro.checks import check_layer, check_steering
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.models.loading import LoadedModel
from fints_repro.preferences.pairs import Pair, attempt_stats, user_pairs
from fints_repro.steering import SteeringInputs
from fints_repro.steering.extract import pair_vectors
from fints_repro.steering.sites import decoder_layers, default_layer

log = logging.getLogger(__name__)


def validate(cfg: SteeringConfig, lm: LoadedModel, layers_path: str = "") -> int:
    """Check the steering config against the model before any model time; return the layer.
    (The pipeline runs the same checks at start-up, before the model is loaded.)"""
    n_layers = len(decoder_layers(lm.model, layers_path))
    check_steering(cfg)
    check_layer(cfg.layer, n_layers)
    return cfg.layer if cfg.layer is not None else default_layer(lm.model, layers_path)


def strength(cfg: SteeringConfig, site: str) -> float:
    return cfg.scale * {"attn": cfg.alpha, "mlp": cfg.beta, "resid": cfg.gamma}[site]


@dataclass
class PairVectors:
    layer: int
    pairs: list[Pair]  # all users' pairs, grouped by user
    rows: dict[str, list[int]]  # user -> indices into pairs / vectors
    vectors: dict[str, torch.Tensor]  # site -> [len(pairs), H]
    attempts: dict = field(default_factory=dict)  # pairs.attempt_stats of the pairs


def prepare(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
            inputs: SteeringInputs, chosen_weights=None) -> PairVectors:
    """Pairs and one vector per pair. ``chosen_weights(pairs)``: per pair, weights over
    the chosen side's answer tokens (SteerX's selected tokens); None: the plain mean."""
    layer = validate(cfg, lm, inputs.layers_path)
    by_user = user_pairs(cfg.pairs, samples, inputs)
    pairs: list[Pair] = []
    rows: dict[str, list[int]] = {}
    for user, ps in by_user.items():
        rows[user] = list(range(len(pairs), len(pairs) + len(ps)))
        pairs.extend(ps)
    vectors = pair_vectors(lm, pairs, layer, list(cfg.sites), attn_read=cfg.attn_read,
                           answer_tokenization=cfg.answer_tokenization,
                           batch_size=cfg.extract_batch_size, cache_dir=inputs.cache_dir,
                           layers_path=inputs.layers_path, progress=inputs.progress,
                           overlength=inputs.overlength,
                           chosen_weights=chosen_weights(pairs) if chosen_weights and pairs else None,
                           **extraction_context(inputs, pairs))
    return PairVectors(layer, pairs, rows, vectors, attempt_stats(by_user))


def extraction_context(inputs: SteeringInputs, pairs: Sequence[Pair]) -> dict:
    """Extraction with each pair's user's model context (a backbone's adapter)."""
    if inputs.user_context is None:
        return {}
    ctx, ident = inputs.user_context, inputs.user_identity or (lambda u: "")
    return {"row_context": lambda rows: ctx([pairs[i].user for i in rows]),
            "identities": [ident(p.user) for p in pairs]}


def plan_stats(pv: PairVectors, steered: Sequence[bool]) -> dict:
    return {"layer": pv.layer, "n_pairs": len(pv.pairs),
            "n_users_with_pairs": sum(1 for r in pv.rows.values() if r),
            "n_samples_steered": int(sum(steered)),
            "n_samples_unsteered": int(len(steered) - sum(steered)), **pv.attempts}
