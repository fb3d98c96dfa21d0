"""BiPO: bi-directional preference optimisation of a steering vector (CaoYuanpu/BiPO).

One vector v at one layer, added to the decoder block's output (the residual stream
after layer L, site ``resid``) at every position, zero-initialised, the model frozen.
Each step draws one direction d in {-1, +1} for the batch and minimises

    -log sigmoid(d * beta * [(log p_{+dv}(y_w|x) - log p(y_w|x))
                             - (log p_{+dv}(y_l|x) - log p(y_l|x))])

(mean over the batch), log-probabilities summed over the answer tokens and the EOS token
appended after them, the reference log-probabilities from the same model with no vector.
AdamW with a cosine schedule after a linear warm-up, the gradient's norm clipped; the
defaults are what their code runs (beta 0.1, lr 5e-4, no weight decay, batch 4, 100
warm-up steps, clipping at 1.0: ``steering.bipo.append_eos``, ``warmup_steps`` and
``max_grad_norm`` switch each off). ``steering.bipo.scope=user`` trains one vector per user on that user's pairs,
``all`` one vector on every pair. In generation the vector is added with the strength
``gamma * scale``. Vectors are cached by content hash (model, layer, settings, pairs) with
their loss curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fints_repro.cache import content_hash, lock_for
from fints_repro.checks import at_least, one_of, positive
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import Sample
from fints_repro.errors import ConfigError
from fints_repro.models.loading import LoadedModel
from fints_repro.preferences.pairs import Pair, attempt_stats, user_pairs
from fints_repro.registry import settings_of
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.steering.extract import answer_weights, pad_batch
from fints_repro.steering.hooks import steer
from fints_repro.steering.logprob import packed, sequence_logprobs
from fints_repro.steering.methods.common import strength, validate
from fints_repro.steering.sites import hidden_size
from fints_repro.steering.store import load_vectors, save_vectors

log = logging.getLogger(__name__)

SITE = "resid"


NAME = "bipo"


@dataclass
class BiPOSettings:
    """``steering.bipo.*``: a vector trained by bi-directional preference optimisation
    (defaults: the BiPO code's). One optimiser step per batch of pairs; ``epochs`` passes
    over the pairs unless ``max_steps`` is set."""

    scope: str = "user"  # user: one vector per user from their pairs; all: one for every pair
    dpo_beta: float = 0.1
    lr: float = 5e-4
    # Their train.py declares weight_decay=0.05 but never passes it to the trainer, whose
    # default (0.0) is what runs.
    weight_decay: float = 0.0
    batch_size: int = 4
    # The BiPO code trains 5-20 epochs over thousands of pairs; a demo user has 10-14
    # pairs, so 20 epochs are 20 * ceil(pairs / 4) = 60-80 steps.
    epochs: int = 20
    max_steps: Optional[int] = None
    # Their trainer's schedule (bipo_trainer.py, train.py, transformers' Trainer): the EOS
    # token appended to both answers (its log-probability in the loss), a linear warm-up
    # over the first warmup_steps steps of the cosine schedule, and the gradient's norm
    # clipped at max_grad_norm (null: no clipping).
    append_eos: bool = True
    warmup_steps: int = 100
    max_grad_norm: Optional[float] = 1.0

    def check(self, key: str, steering: SteeringConfig) -> None:
        one_of(f"{key}.scope", self.scope, ("user", "all"))
        positive(f"{key}.dpo_beta", self.dpo_beta)
        positive(f"{key}.lr", self.lr)
        at_least(f"{key}.weight_decay", self.weight_decay, 0)
        at_least(f"{key}.batch_size", self.batch_size, 1)
        at_least(f"{key}.epochs", self.epochs, 1)
        at_least(f"{key}.max_steps", self.max_steps, 1, optional=True)
        at_least(f"{key}.warmup_steps", self.warmup_steps, 0)
        positive(f"{key}.max_grad_norm", self.max_grad_norm, optional=True)


def bipo_loss(model: torch.nn.Module, layer: int, v: torch.Tensor, d: float, beta: float,
              chosen: tuple, rejected: tuple, ref_w: torch.Tensor, ref_l: torch.Tensor,
              layers_path: str = "", chosen_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean BiPO loss for direction ``d``; ``chosen`` / ``rejected``: the
    (ids, attention mask, answer mask) of the two sides, ``ref_*`` their log-probabilities
    without the vector; ``chosen_weights`` ``[B, T]``: the chosen side's log-likelihood over
    these token weights only (SteerX's selected tokens)."""
    with steer(model, {(layer, SITE): d * v}, "all", layers_path=layers_path):
        lw = sequence_logprobs(model, *chosen, weights=chosen_weights)
        ll = sequence_logprobs(model, *rejected)
    margin = (lw - ref_w.to(lw.device)) - (ll - ref_l.to(ll.device))
    return -torch.nn.functional.logsigmoid(d * beta * margin).mean()


@torch.no_grad()
def _reference(model: torch.nn.Module, seqs, pad: int, size: int, token_weights=None) -> torch.Tensor:
    """Log-probabilities of every sequence with no vector (the reference policy)."""
    out = []
    for i in range(0, len(seqs), size):
        rows = list(range(i, min(i + size, len(seqs))))
        w = answer_weights(seqs, rows, token_weights) if token_weights is not None else None
        out.append(sequence_logprobs(model, *pad_batch(seqs, rows, pad), weights=w).cpu())
    return torch.cat(out)


def with_eos(seqs: list[tuple[list[int], int]], tok) -> list[tuple[list[int], int]]:
    """Each (ids, answer start) with the EOS token after the answer, unless it ends with
    one (their trainer's ``tokenize_row``)."""
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError("steering.bipo.append_eos: the tokenizer has no EOS token; set it false")
    return [(ids if ids[-1] == eos else [*ids, eos], start) for ids, start in seqs]


def train_vector(lm: LoadedModel, pairs: Sequence[Pair], layer: int, cfg: BiPOSettings, *,
                 tokenization: str = "separate", layers_path: str = "", seed: int = 0,
                 chosen_weights: Sequence[Sequence[float]] | None = None,
                 ) -> tuple[torch.Tensor, list[float]]:
    """One BiPO vector ``[H]`` (float32, CPU) trained on ``pairs``, and the loss per step;
    ``chosen_weights[i]``: weights over pair i's chosen answer tokens (SteerX)."""
    from transformers import get_cosine_schedule_with_warmup

    model = lm.model
    param = next(model.parameters())
    qs = [p.prompt for p in pairs]
    w_seqs = packed(lm, qs, [p.chosen for p in pairs], tokenization)
    l_seqs = packed(lm, qs, [p.rejected for p in pairs], tokenization)
    if cfg.append_eos:
        w_seqs, l_seqs = with_eos(w_seqs, lm.tokenizer), with_eos(l_seqs, lm.tokenizer)
        if chosen_weights is not None:  # the EOS counts as the answer's own token
            chosen_weights = [list(w) + [1.0] * (len(s) - start - len(w))
                              for w, (s, start) in zip(chosen_weights, w_seqs)]
    pad = lm.tokenizer.pad_token_id
    ref_w = _reference(model, w_seqs, pad, cfg.batch_size, chosen_weights)
    ref_l = _reference(model, l_seqs, pad, cfg.batch_size)
    v = torch.zeros(hidden_size(model), dtype=torch.float32, device=param.device, requires_grad=True)
    opt = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * per_epoch
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total)
    rng = random.Random(f"{seed}|bipo")
    losses: list[float] = []
    order: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(total):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            rows, order = order[:cfg.batch_size], order[cfg.batch_size:]
            d = rng.choice((-1.0, 1.0))
            cw = answer_weights(w_seqs, rows, chosen_weights) if chosen_weights is not None else None
            loss = bipo_loss(model, layer, v, d, cfg.dpo_beta, pad_batch(w_seqs, rows, pad),
                             pad_batch(l_seqs, rows, pad), ref_w[rows], ref_l[rows], layers_path, cw)
            (grad,) = torch.autograd.grad(loss, [v])  # the model's weights get no gradient
            v.grad = grad
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([v], cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.train(was_training)
    return v.detach().float().cpu(), losses


def _group_vectors(lm: LoadedModel, by_user: dict[str, list[Pair]], layer: int,
                   own: BiPOSettings, cfg: SteeringConfig, inputs: SteeringInputs,
                   recipe: dict[str, Any], chosen_weights
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict[str, list[Pair]]]:
    """One vector per group of pairs (a user's, or everyone's: ``scope``), each cached by
    the content hash of its recipe and pairs; with the loss curves, and the groups."""
    groups = ({u: ps for u, ps in by_user.items() if ps} if own.scope == "user"
              else {"*": [p for ps in by_user.values() for p in ps]})
    groups = {g: ps for g, ps in groups.items() if ps}
    vectors: dict[str, torch.Tensor] = {}
    curves: dict[str, list[float]] = {}
    for g, ps in groups.items():
        cw = chosen_weights(ps) if chosen_weights is not None else None
        parts = [recipe, [[p.prompt, p.chosen, p.rejected] for p in ps]]
        if cw is not None:
            parts.append([list(map(float, w)) for w in cw])
        key = content_hash(parts)
        path = Path(inputs.cache_dir) / "vectors" / f"bipo-{key}.safetensors"
        cached = load_vectors(path)
        if cached is not None:
            vectors[g], curves[g] = cached["v"][0], cached["loss"][0].tolist()
            continue
        v, losses = train_vector(lm, ps, layer, own, tokenization=cfg.answer_tokenization,
                                 layers_path=inputs.layers_path, seed=inputs.seed,
                                 chosen_weights=cw)
        save_vectors(path, {"v": v[None], "loss": torch.tensor([losses])},
                     {**recipe, "group": g, "n_pairs": len(ps)})
        log.info("BiPO vector for %s: %d pairs, %d steps, loss %.4f -> %.4f, norm %.3f", g,
                 len(ps), len(losses), losses[0], losses[-1], v.norm().item())
        vectors[g], curves[g] = v, losses
    return vectors, curves, groups


@STEERING.register(NAME, settings=BiPOSettings)
def bipo(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
         inputs: SteeringInputs, chosen_weights=None) -> SteeringPlan:
    """``chosen_weights(pairs)``: per pair, weights over the chosen side's answer tokens
    (SteerX); None: every token."""
    own: BiPOSettings = settings_of(cfg, NAME, "steering")
    layer = validate(cfg, lm, inputs.layers_path)
    recipe = {"model": lm.fingerprint, "layer": layer, "site": SITE,
              "tokenization": cfg.answer_tokenization, "bipo": dataclasses.asdict(own),
              "seed": inputs.seed}
    # scope=all in one part of a sharded experiment: the one vector over every user's
    # pairs, made by the first part under a lock the other parts wait on, then read
    everyone = own.scope == "all" and bool(inputs.all_samples)
    pair_samples = inputs.all_samples if everyone else samples
    guard: Any = contextlib.nullcontext()
    if everyone:
        key = content_hash([recipe, dataclasses.asdict(cfg.pairs), [s.id for s in pair_samples]])
        guard = lock_for(Path(inputs.cache_dir) / "vectors" / f"bipo-all-{key}")
    with guard:
        by_user = user_pairs(cfg.pairs, pair_samples, inputs)
        vectors, curves, groups = _group_vectors(lm, by_user, layer, own, cfg, inputs, recipe,
                                                 chosen_weights)
    H = hidden_size(lm.model)
    out = torch.zeros((len(samples), H))
    steered = []
    for i, s in enumerate(samples):
        g = s.user if own.scope == "user" else "*"
        steered.append(g in vectors)
        if g in vectors:
            out[i] = strength(cfg, SITE) * vectors[g]
    n = max((len(c) for c in curves.values()), default=0)
    curve = [sum(c[t] for c in curves.values() if t < len(c)) / sum(1 for c in curves.values() if t < len(c))
             for t in range(n)]
    stats = {"layer": layer, "n_pairs": sum(len(ps) for ps in groups.values()),
             **attempt_stats(by_user),
             "n_vectors": len(vectors), "n_samples_steered": int(sum(steered)),
             "n_samples_unsteered": int(len(steered) - sum(steered)),
             "bipo_loss_first": curve[0] if curve else None,
             "bipo_loss_last": curve[-1] if curve else None,
             "bipo_loss_curve": [round(x, 6) for x in curve],
             # the trained vectors' L2 norm (before the strength), mean over groups: how far
             # the budget moved them from zero
             "bipo_vector_norm_mean": (sum(v.norm().item() for v in vectors.values()) / len(vectors)
                                       if vectors else None)}
    info = [{"bipo_group": (s.user if own.scope == "user" else "*")} for s in samples]
    return SteeringPlan({(layer, SITE): out}, steered, cfg.positions, inputs.layers_path, stats, info)
