"""SteerX, as we read it (arXiv 2510.22256; its code is not public): steer with what in a
user's outputs their preference drives, found by a token-level causal effect.

1. For each pair, the user's own output y (the chosen side) is scored token by token
   under two prompts: the pair's question with the user's other history items (H: the
   item's RAG prompt, top-k by the run's retriever, the dataset's RAG template) and the
   question alone (no history):
   ``delta_t = log p(y_t | x, H, y_<t) - log p(y_t | x, y_<t)`` (``effect=logprob``), or
   the difference of probabilities (``effect=prob``, NextQuill's estimator). One batched
   forward per variant; y is tokenised apart, so both variants score the same tokens.
2. Preference-driven tokens: ``delta_t > tau``; an output with none keeps its top
   ``ceil(top_q * n)`` tokens by delta, so no pair is left without tokens.
3. The backbone's vectors from those tokens only: CAA and fine-grained average the chosen
   side's activations over the selected answer positions (the rejected side over all of
   its tokens); BiPO restricts the chosen side's log-likelihood to them.

With ``tau=-inf`` every token is selected and SteerX is its backbone, vectors and
predictions bit for bit (tested). The selected share and per-row token counts are
reported; the selected tokens of each user's outputs are in ``predictions.jsonl``.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from fints_repro.backbones.prompting import render_with_history
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.models.loading import LoadedModel
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.steering.logprob import token_logprobs
from fints_repro.steering.methods.common import prepare
from fints_repro.steering.pairs import Pair, user_history

log = logging.getLogger(__name__)


def history_prompts(pairs: Sequence[Pair], history: dict[str, list[HistoryItem]],
                    inputs: SteeringInputs, k: int) -> list[str]:
    """Each pair's question with its user's other history items (top-k for the question
    by the run's retriever), by the dataset's RAG template; no other item: the question."""
    others = [[h for h in history.get(p.user, []) if h.id != p.item_id] for p in pairs]
    with_items = [i for i, o in enumerate(others) if o]
    ranked = inputs.retriever().rank_many(
        [pairs[i].question for i in with_items],
        [[inputs.task.history_document(h) for h in others[i]] for i in with_items], k,
    ) if with_items and k > 0 else []
    prompts = [p.question for p in pairs]
    for i, ranking in zip(with_items, ranked):
        prompts[i] = render_with_history(inputs.dataset, pairs[i].question,
                                         [others[i][j] for j, _ in ranking])
    return prompts


def causal_effects(lm: LoadedModel, pairs: Sequence[Pair], prompts_h: Sequence[str],
                   effect: str = "logprob", batch_size: int = 8) -> list[torch.Tensor]:
    """Per pair, delta_t for each token of the chosen side (see the module docstring)."""
    answers = [p.chosen for p in pairs]
    with_h = token_logprobs(lm, list(prompts_h), answers, batch_size=batch_size)
    without = token_logprobs(lm, [p.question for p in pairs], answers, batch_size=batch_size)
    if effect == "prob":
        return [a.exp() - b.exp() for a, b in zip(with_h, without)]
    return [a - b for a, b in zip(with_h, without)]


def select_tokens(deltas: Sequence[torch.Tensor], tau: float, top_q: float) -> list[list[float]]:
    """1/0 weights per token: delta > tau, or the top ceil(top_q * n) where none is."""
    out = []
    for d in deltas:
        w = (d > tau).float()
        if w.sum() == 0:
            top = torch.topk(d, max(1, math.ceil(top_q * len(d)))).indices
            w[top] = 1.0
        out.append(w.tolist())
    return out


@STEERING.register("steerx")
def steerx(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
           inputs: SteeringInputs) -> SteeringPlan:
    own = cfg.steerx
    history = user_history(samples)
    k = own.k if own.k is not None else inputs.dataset.rag_k
    info: dict[str, object] = {}

    def weights(pairs: Sequence[Pair]) -> list[list[float]]:
        deltas = causal_effects(lm, pairs, history_prompts(pairs, history, inputs, k),
                                own.effect, own.batch_size)
        w = select_tokens(deltas, own.tau, own.top_q)
        n_sel, n_all = sum(map(sum, w)), sum(map(len, w))
        info["share"] = n_sel / n_all if n_all else None
        tok = lm.tokenizer
        for p, ws in zip(pairs, w):
            ids = tok(" " + p.chosen, add_special_tokens=False)["input_ids"]
            picked = [tok.decode([t]).strip() for t, x in zip(ids, ws) if x]
            info.setdefault("tokens", {}).setdefault(p.user, []).extend(picked)  # type: ignore[union-attr]
        log.info("steerx: %d of %d answer tokens selected (tau %s, %s)", n_sel, n_all, own.tau, own.effect)
        return w

    if own.backbone == "bipo":
        from fints_repro.steering.methods.bipo import bipo

        plan = bipo(cfg, lm, samples, inputs, chosen_weights=weights)
    else:
        pv = prepare(cfg, lm, samples, inputs, chosen_weights=weights)
        if own.backbone == "caa":
            from fints_repro.steering.methods.caa import caa

            plan = caa(cfg, lm, samples, inputs, pv=pv)
        else:
            from fints_repro.steering.methods.fine_grained import fine_grained

            plan = fine_grained(cfg, lm, samples, inputs, pv=pv)
    plan.stats["steerx_token_share"] = info.get("share")
    tokens = info.get("tokens", {})
    plan.row_info = [{**(plan.row_info[i] if plan.row_info else {}),
                      "steerx_tokens": tokens.get(s.user, [])[:40]}  # type: ignore[union-attr]
                     for i, s in enumerate(samples)]
    return plan
