"""SteerX, as we read it (arXiv 2510.22256; its code is not public): steer with what in a
user's outputs their preference drives, found by a token-level causal effect.

1. For each pair, the user's own output y (the chosen side) is scored token by token
   under two prompts: the pair's question with the user's other history items (H: the
   item's RAG prompt, top-k by the run's retriever, the dataset's RAG template) and the
   question alone (no history):
   ``delta_t = log p(y_t | x, H, y_<t) - log p(y_t | x, y_<t)`` (``effect=logprob``), or
   the difference of probabilities (``effect=prob``, NextQuill's estimator). One batched
   forward per variant; y is tokenised apart, so both variants score the same tokens.
2. Preference-driven tokens: ``delta_t > token_threshold``; an output with none keeps its top
   ``ceil(top_q * n)`` tokens by delta, so no pair is left without tokens.
   The two log-prob passes are cached by content (``<cache_dir>/steerx/``).
3. The user's preference in words (``steering.steerx.description``): the run's LLM, with
   no task system prompt, writes one sentence from the user's selected tokens (the
   distinct ones of largest summed delta), greedily, cached per prompt.
4. The backbone's vectors from the selected tokens only: CAA and fine-grained average the
   chosen side's activations over the selected answer positions (the rejected side over
   all of its tokens); BiPO restricts the chosen side's log-likelihood to them. With
   ``use_description`` the contrast "question + description" vs "question" (the mean
   over the user's pairs of the chosen side's activations under each, at every site the
   backbone steers) is added, times the site's strength.

With ``token_threshold=-inf`` and ``use_description`` off, every token is selected and SteerX is its
backbone, vectors and predictions bit for bit (tested). The selected share is reported;
each row's user's top tokens and description are in ``predictions.jsonl``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from fints_repro.cache import atomic_file, content_hash
from fints_repro.checks import at_least, fail, has_placeholders, in_range, one_of
from fints_repro.config import SteeringConfig
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import DataError
from fints_repro.models.engines import greedy_cached
from fints_repro.models.loading import LoadedModel
from fints_repro.preferences.pairs import Pair, user_history
from fints_repro.registry import settings_of
from fints_repro.steering import STEERING, SteeringInputs, SteeringPlan
from fints_repro.steering.extract import answer_means
from fints_repro.steering.logprob import token_logprobs
from fints_repro.steering.methods.common import extraction_context, strength
from fints_repro.steering.store import load_vectors, save_vectors
from fints_repro.tasks.prompts import render_with_history

log = logging.getLogger(__name__)


NAME = "steerx"


@dataclass
class SteerXSettings:
    """``steering.steerx.*`` (our reading of SteerX, arXiv 2510.22256): vectors of the
    ``base`` method built from the preference-driven tokens of each user's outputs
    only, the tokens whose log-probability the user's own history raises by more than
    ``tau`` (docs/methods.md)."""

    # the steering method whose vectors are built from the selected tokens: any registered
    # method that takes chosen_weights (caa, bipo, fine_grained)
    base: str = "caa"
    # logprob: delta_t = log p(y_t | x, H) - log p(y_t | x, no history); prob: the
    # difference of probabilities (NextQuill's, with tau 0.05)
    effect: str = "logprob"
    token_threshold: float = 0.0
    # an output with no token above tau keeps its top ceil(top_q * n) tokens by delta
    top_q: float = 0.2
    # history items of the user in H (the item's RAG prompt; null = dataset.rag_k)
    k: Optional[int] = None
    batch_size: int = 8
    # 3. The user's preference in words, written greedily by the run's LLM (no task system
    # prompt) from the user's selected tokens: the `description_tokens` distinct ones of
    # largest summed delta; cached, in predictions.jsonl as `steerx_description`.
    description: bool = True
    description_tokens: int = 30
    description_max_new_tokens: int = 48
    description_prompt: str = (
        "These words are the ones a user's own texts use because of who the user is:\n"
        "{tokens}\n\nIn one sentence, describe what this user prefers (topics, style, "
        "wording).")
    # 4. use_description: add, at each steered site, the mean over the user's pairs of the
    # chosen side's activations under "question + description" minus under the question
    # (times the site's strength); off = SteerX is its backbone on the selected tokens.
    use_description: bool = False
    description_question_template: str = "{question}\n\nAbout this user: {description}"

    def check(self, key: str, steering: SteeringConfig) -> None:
        if self.base == NAME or "chosen_weights" not in inspect.signature(STEERING.get(self.base, f"{key}.base")).parameters:
            fail(f"{key}.base", self.base, "is not a steering method that takes token weights "
                 "(chosen_weights): e.g. caa, bipo, fine_grained")
        one_of(f"{key}.effect", self.effect, ("logprob", "prob"))
        if not (isinstance(self.token_threshold, (int, float)) and (math.isfinite(self.token_threshold) or self.token_threshold == -math.inf)):
            fail(f"{key}.token_threshold", self.token_threshold, "must be a finite number (or -inf: every token)")
        in_range(f"{key}.top_q", self.top_q, 0, 1, low_open=True)
        at_least(f"{key}.k", self.k, 1, optional=True)
        at_least(f"{key}.batch_size", self.batch_size, 1)
        at_least(f"{key}.description_tokens", self.description_tokens, 1)
        at_least(f"{key}.description_max_new_tokens", self.description_max_new_tokens, 1)
        if self.use_description and not self.description:
            fail(f"{key}.use_description", self.use_description,
                 f"needs the description: set {key}.description=true")
        has_placeholders(f"{key}.description_prompt", self.description_prompt, ["tokens"])
        has_placeholders(f"{key}.description_question_template",
                         self.description_question_template, ["question", "description"])
        if steering.name == NAME and steering.answer_tokenization != "separate":
            fail(key.rsplit(".", 1)[0] + ".answer_tokenization", steering.answer_tokenization,
                 "steering=steerx selects answer tokens as tokenised apart: set it to separate")


def history_prompts(pairs: Sequence[Pair], history: dict[str, list[HistoryItem]],
                    inputs: SteeringInputs, k: int) -> list[str]:
    """Each pair's question with its user's other history items (top-k for the question
    by the run's retriever), by the dataset's RAG template; no other item: the question."""
    others = [[h for h in history.get(p.user, []) if h.id != p.item_id] for p in pairs]
    with_items = [i for i, o in enumerate(others) if o]
    ranked = inputs.retriever().rank_many(
        [pairs[i].prompt for i in with_items],
        [[inputs.task.history_document(h) for h in others[i]] for i in with_items], k,
    ) if with_items and k > 0 else []
    prompts = [p.prompt for p in pairs]
    for i, ranking in zip(with_items, ranked):
        prompts[i] = render_with_history(inputs.dataset, pairs[i].prompt,
                                         [others[i][j] for j, _ in ranking])
    return prompts


def _logprob_passes(lm: LoadedModel, prompts_h: Sequence[str], questions: Sequence[str],
                    answers: Sequence[str], batch_size: int, cache_dir: str | Path | None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per answer, its tokens' log-probs with the history prompt and with the question
    alone; cached in ``<cache_dir>/steerx/logprobs-<hash>.json`` (float32 values, exact
    through JSON). A file that does not read back is computed again."""
    def compute():
        return (token_logprobs(lm, list(prompts_h), list(answers), batch_size=batch_size),
                token_logprobs(lm, list(questions), list(answers), batch_size=batch_size))

    if cache_dir is None:
        return compute()
    key = content_hash([lm.fingerprint, list(prompts_h), list(questions), list(answers)])
    path = Path(cache_dir) / "steerx" / f"logprobs-{key}.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            got = tuple([torch.tensor(x, dtype=torch.float32) for x in raw[side]]
                        for side in ("with", "without"))
            if all(len(g) == len(answers) for g in got):
                return got  # type: ignore[return-value]
            raise ValueError(f"{len(got[0])} rows for {len(answers)} answers")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("steerx: the cached log-probs %s do not read back (%s): computing them "
                        "again", path, e)
    with_h, without = compute()
    with atomic_file(path, "SteerX's log-probs") as tmp:
        tmp.write_text(json.dumps({"with": [t.tolist() for t in with_h],
                                   "without": [t.tolist() for t in without]}))
    return with_h, without


def causal_effects(lm: LoadedModel, pairs: Sequence[Pair], prompts_h: Sequence[str],
                   effect: str = "logprob", batch_size: int = 8,
                   cache_dir: str | Path | None = None) -> list[torch.Tensor]:
    """Per pair, delta_t for each token of the chosen side (see the module docstring)."""
    with_h, without = _logprob_passes(lm, prompts_h, [p.prompt for p in pairs],
                                      [p.chosen for p in pairs], batch_size, cache_dir)
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


def preference_tokens(lm: LoadedModel, pairs: Sequence[Pair], deltas: Sequence[torch.Tensor],
                      weights: Sequence[Sequence[float]], n: int) -> dict[str, list[str]]:
    """Per user, the ``n`` distinct selected tokens (decoded, stripped; without a letter or
    digit: left out) of largest summed delta over the user's outputs, ties in first-seen
    order: what the description is written from."""
    tok = lm.tokenizer
    ids = tok([" " + p.chosen for p in pairs], add_special_tokens=False)["input_ids"]
    total: dict[str, dict[str, float]] = defaultdict(dict)
    for p, t_ids, d, w in zip(pairs, ids, deltas, weights):
        mine = total[p.user]
        for t, x, keep in zip(t_ids, d.tolist(), w):
            word = tok.decode([t]).strip()
            if keep and any(c.isalnum() for c in word):
                mine[word] = mine.get(word, 0.0) + x
    return {u: sorted(m, key=lambda w: -m[w])[:n] for u, m in total.items()}


def describe_users(lm: LoadedModel, tokens: dict[str, list[str]], own: SteerXSettings,
                   inputs: SteeringInputs) -> dict[str, str]:
    """Per user with tokens, one sentence of the run's LLM about the user's preference
    (greedy, no task system prompt, cached per prompt in ``<cache_dir>/steerx/``)."""
    users = [u for u in sorted(tokens) if tokens[u]]
    prompts = [own.description_prompt.format(tokens=", ".join(tokens[u])) for u in users]

    def too_long(i: int, n: int) -> Exception:
        return DataError(f"steerx: the description prompt of user {users[i]!r} has {n} tokens, "
                         "more than the model's context; lower steering.steerx.description_tokens",
                         record=users[i])

    written, _ = greedy_cached(lm, prompts, own.description_max_new_tokens,
                               store_dir=Path(inputs.cache_dir) / "steerx", seed=inputs.seed,
                               batch_size=own.batch_size, overlength=inputs.overlength,
                               progress=inputs.progress, desc="steerx descriptions",
                               describe=too_long, system_prompt=None)
    return {u: w.strip() for u, w in zip(users, written) if w.strip()}


def description_vectors(cfg: SteeringConfig, lm: LoadedModel, pairs: Sequence[Pair],
                        descriptions: dict[str, str], layer: int, sites: Sequence[str],
                        inputs: SteeringInputs) -> dict[str, dict[str, torch.Tensor]]:
    """Per user with a description, ``{site: [H]}``: the mean over the user's pairs of the
    chosen side's mean activation (over its answer tokens) under
    ``description_question_template`` minus under the question alone; read as extraction
    reads (``steering.attn_read``, the user's adapter), cached like pair vectors."""
    own: SteerXSettings = settings_of(cfg, NAME, "steering")
    mine = [p for p in pairs if p.user in descriptions]
    if not mine:
        return {}
    with_d = [own.description_question_template.format(question=p.prompt,
                                                       description=descriptions[p.user])
              for p in mine]
    answers = [p.chosen for p in mine]
    per_user = extraction_context(inputs, mine)
    recipe = {"model": lm.fingerprint, "layer": layer, "sites": sorted(sites),
              "attn_read": cfg.attn_read, "tokenization": cfg.answer_tokenization,
              "identities": content_hash(list(per_user.get("identities", [])))}
    key = content_hash([recipe, [[q, p.prompt, p.chosen] for q, p in zip(with_d, mine)]])
    path = Path(inputs.cache_dir) / "vectors" / f"steerx-description-{key}.safetensors"
    diff = load_vectors(path)
    if diff is None:
        common = dict(attn_read=cfg.attn_read, answer_tokenization=cfg.answer_tokenization,
                      batch_size=cfg.extract_batch_size, layers_path=inputs.layers_path,
                      progress=inputs.progress, overlength=inputs.overlength,
                      row_context=per_user.get("row_context"))
        names = [f"the chosen side of the pair for item {p.item_id!r} of user {p.user!r}"
                 for p in mine]
        a = answer_means(lm, with_d, answers, layer, sites, desc="steerx description",
                         names=[n + " with the description" for n in names], **common)
        b = answer_means(lm, [p.prompt for p in mine], answers, layer, sites,
                         desc="steerx no description", names=names, **common)
        diff = {s: a[s] - b[s] for s in sites}
        save_vectors(path, diff, {**recipe, "n_pairs": len(mine)})
    rows: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(mine):
        rows[p.user].append(i)
    return {u: {s: diff[s][r].mean(0) for s in sites} for u, r in rows.items()}


@STEERING.register(NAME, settings=SteerXSettings)
def steerx(cfg: SteeringConfig, lm: LoadedModel, samples: Sequence[Sample],
           inputs: SteeringInputs) -> SteeringPlan:
    own: SteerXSettings = settings_of(cfg, NAME, "steering")
    history = user_history(samples)
    k = own.k if own.k is not None else inputs.dataset.rag_k
    seen: list[tuple[Pair, torch.Tensor, list[float]]] = []  # every pair weighted, in order

    def weights(pairs: Sequence[Pair]) -> list[list[float]]:
        deltas = causal_effects(lm, pairs, history_prompts(pairs, history, inputs, k),
                                own.effect, own.batch_size, inputs.cache_dir)
        w = select_tokens(deltas, own.token_threshold, own.top_q)
        seen.extend(zip(pairs, deltas, w))
        log.info("steerx: %d of %d answer tokens selected (token_threshold %s, %s)", sum(map(sum, w)),
                 sum(map(len, w)), own.token_threshold, own.effect)
        return w

    plan = STEERING.get(own.base, "steering.steerx.base")(cfg, lm, samples, inputs,
                                                          chosen_weights=weights)
    pairs = [p for p, _, _ in seen]
    n_sel, n_all = sum(sum(w) for *_, w in seen), sum(len(w) for *_, w in seen)
    tokens = preference_tokens(lm, pairs, [d for _, d, _ in seen], [w for *_, w in seen],
                               own.description_tokens) if seen else {}
    descriptions = describe_users(lm, tokens, own, inputs) if own.description and tokens else {}
    if own.use_description and descriptions:
        layer_sites = list(plan.vectors)
        dvec = description_vectors(cfg, lm, pairs, descriptions, layer_sites[0][0],
                                   [site for _, site in layer_sites], inputs)
        for i, s in enumerate(samples):
            if plan.steered[i] and s.user in dvec:
                for (layer, site), v in plan.vectors.items():
                    v[i] += strength(cfg, site) * dvec[s.user][site]
        plan.stats["steerx_n_users_with_description_vector"] = len(dvec)
    plan.stats.update({"steerx_token_share": n_sel / n_all if n_all else None,
                       "steerx_n_descriptions": len(descriptions)})
    plan.row_info = [{**(plan.row_info[i] if plan.row_info else {}),
                      "steerx_tokens": tokens.get(s.user, []),
                      "steerx_description": descriptions.get(s.user)}
                     for i, s in enumerate(samples)]
    return plan
