"""CAA-style user-level steering: one vector per user and site, the mean of the user's pair
vectors, times the site's strength (alpha attn, beta mlp, gamma resid). A user with fewer
than ``steering.caa.min_pairs`` pairs is left unsteered.

``steering.caa.across_users`` reproduces the authors' ``train.py``, whose activation lists
are created once, outside the loop over users: a user's vector is the mean over the pairs
of every user processed up to and including them, users taken in the order they first
appear in the training split (the order of the authors' pair file; sorted ids when pairs
come from the profile items)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fints_repro.checks import at_least
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.models.loading import LoadedModel
from fints_repro.registry import settings_of
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.steering.methods.common import PairVectors, plan_stats, prepare, strength
from fints_repro.steering.sites import hidden_size


NAME = "caa"


@dataclass
class CAASettings:
    """``steering.caa.*``: one vector per user, the mean of all the user's pair vectors."""

    # Users with fewer pairs than this are left unsteered (1: every user with a pair).
    min_pairs: int = 1
    # The authors' train.py creates its activation lists once, outside the loop over users:
    # a user's vector is the mean over the pairs of every user processed so far (in the
    # order users first appear in the training split; otherwise sorted), a user without
    # pairs gets the earlier users' mean. false (ours): each user's own pairs.
    across_users: bool = False

    def check(self, key: str, steering: SteeringConfig) -> None:
        at_least(f"{key}.min_pairs", self.min_pairs, 1)


@STEERING.register(NAME, settings=CAASettings)
def caa(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
        inputs: SteeringInputs, chosen_weights=None, pv: PairVectors | None = None) -> SteeringPlan:
    """``chosen_weights(pairs)``: per pair, weights over the chosen side's answer tokens
    (SteerX); ``pv``: pairs and pair vectors made elsewhere; None: made here."""
    own: CAASettings = settings_of(cfg, NAME, "steering")
    pv = pv if pv is not None else prepare(cfg, lm, samples, inputs, chosen_weights=chosen_weights)
    rows = pv.rows
    if own.across_users:
        rows, seen = {}, []
        for u in user_order(cfg, samples, inputs):
            seen = seen + pv.rows.get(u, [])
            rows[u] = seen
    enough = {u for u, r in rows.items() if r and len(r) >= own.min_pairs}
    steered = [s.user in enough for s in samples]
    H = hidden_size(lm.model)
    vectors = {}
    for site in cfg.sites:
        out = torch.zeros((len(samples), H), dtype=torch.float32)
        user_mean = {u: pv.vectors[site][rows[u]].mean(0) for u in enough}
        for i, s in enumerate(samples):
            if s.user in user_mean:
                out[i] = strength(cfg, site) * user_mean[s.user]
        vectors[(pv.layer, site)] = out
    info = [{"n_pairs": len(rows.get(s.user, []))} for s in samples]
    return SteeringPlan(vectors, steered, cfg.positions, inputs.layers_path,
                        plan_stats(pv, steered), info)


def user_order(cfg: SteeringConfig, samples: Sequence[Sample], inputs: SteeringInputs) -> list[str]:
    """The run's users in the order the authors' ``train.py`` meets them: as they first
    appear in the training split (``steering.pairs.source=train_samples``), then the rest
    sorted."""
    users = {s.user for s in samples}
    first = []
    if cfg.pairs.source == "train_samples" and inputs.pair_items:
        first = [u for u in inputs.pair_items() if u in users]
    return first + sorted(users - set(first))
