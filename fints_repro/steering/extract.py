"""One steering vector per contrastive pair, site and layer (docs/fidelity.md):

    v_i = mean(a(q + chosen)[answer tokens]) - mean(a(q + rejected)[answer tokens])

on plain text (no chat template). Answer tokens, by ``answer_tokenization``:

- ``separate`` (ours): the question is tokenized on its own and " " + answer appended as
  its own tokens, so the answer tokens are exactly the answer's;
- ``joint`` (the authors' code, ``train.py`` / ``PerSteer.get_vectors``): question + answer
  tokenized as one string, no separator, with the tokenizer's special tokens; the answer
  tokens are the positions from len(tokens(question)) on (a token merged across the
  boundary counts as the answer's when it ends there).

Sequences run in right-padded batches (positions then start at 0, as unpadded), one user's
pairs per batch, sorted by length, and each forward pass stops after the deepest layer
needed. Vectors are cached by
content hash (model, layer, sites, read mode, tokenization, pairs).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from fints_repro.cache import content_hash
from fints_repro.models.chat import OVERLENGTH, clip_token_sequence
from fints_repro.models.inspect import shape_of
from fints_repro.models.loading import LoadedModel
from fints_repro.preferences.pairs import Pair
from fints_repro.steering.hooks import capture
from fints_repro.steering.sites import SITES, SteeringError
from fints_repro.steering.store import load_vectors, save_vectors

log = logging.getLogger(__name__)

ATTN_READS = ("output", "residual")
ANSWER_TOKENIZATIONS = ("separate", "joint")


def read_site(site: str, attn_read: str) -> str:
    """The capture site extraction reads for a steering site."""
    if attn_read not in ATTN_READS:
        raise SteeringError(f"steering.attn_read={attn_read!r}; expected one of {list(ATTN_READS)}")
    return "attn_residual" if site == "attn" and attn_read == "residual" else site


def tokenize_pair_texts(lm: LoadedModel, questions: Sequence[str], answers: Sequence[str],
                        mode: str = "separate"):
    """(ids, answer start) per sequence. ``separate``: question ids (with the tokenizer's
    own special tokens, e.g. BOS) followed by the ids of " " + answer. ``joint``: the ids of
    question + answer as one string (special tokens included), the answer from
    len(question ids) on."""
    if mode not in ANSWER_TOKENIZATIONS:
        raise SteeringError(f"steering.answer_tokenization={mode!r}; expected one of "
                            f"{list(ANSWER_TOKENIZATIONS)}")
    tok = lm.tokenizer
    q_ids = tok(list(questions))["input_ids"]
    if mode == "joint":
        full = tok([q + a for q, a in zip(questions, answers)])["input_ids"]
        return [(f, len(q)) for f, q in zip(full, q_ids)]
    a_ids = tok([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    return [(q + a, len(q)) for q, a in zip(q_ids, a_ids)]


def pad_batch(seqs: Sequence[tuple[list[int], int]], rows: Sequence[int], pad: int):
    """Right-padded ``input_ids``, ``attention_mask`` and the bool answer mask of the
    (ids, answer start) sequences ``rows``."""
    width = max(len(seqs[i][0]) for i in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    answer = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, i in enumerate(rows):
        seq, start = seqs[i]
        ids[r, :len(seq)] = torch.tensor(seq)
        attn[r, :len(seq)] = 1
        answer[r, start:len(seq)] = True
    return ids, attn, answer


def answer_weights(seqs: Sequence[tuple[list[int], int]], rows: Sequence[int],
                   token_weights: Sequence[Sequence[float]]) -> torch.Tensor:
    """``[len(rows), width]`` float weights over the answer positions of ``rows`` (laid out
    as ``pad_batch``), from one weight per answer token; 0 elsewhere."""
    width = max(len(seqs[i][0]) for i in rows)
    w = torch.zeros((len(rows), width))
    for r, i in enumerate(rows):
        seq, start = seqs[i]
        w[r, start:len(seq)] = torch.tensor(list(token_weights[i]), dtype=torch.float32)
    return w


@torch.inference_mode()
def answer_means(
    lm: LoadedModel, questions: Sequence[str], answers: Sequence[str], layer: int,
    sites: Sequence[str], *, attn_read: str = "output", answer_tokenization: str = "separate",
    batch_size: int = 8, layers_path: str = "", progress: bool = True, desc: str = "extract",
    stop_early: bool = True, overlength: str = "error", names: Sequence[str] | None = None,
    row_context: Callable[[list[int]], ContextManager] | None = None,
    token_weights: Sequence[Sequence[float]] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean activation over answer tokens, ``{site: [N, H]}`` (float32, CPU); with
    ``token_weights[i]`` (one weight per answer token of sequence i) the weighted mean
    (SteerX: 1 on the selected tokens, 0 elsewhere; all ones = the plain mean, bit for bit).
    ``stop_early=False`` runs the whole model (only the benchmark's baseline wants that).
    A sequence longer than the model's context stops with an error naming it (``names[i]``)
    or, with ``overlength="truncate"``, loses question tokens from its middle (the answer
    is kept whole). ``row_context(rows)``: the context each batch's forward runs in, given
    the indices of its sequences; a dict it yields goes to the forward (e.g. PEFT's
    per-row ``adapter_names``). ``groups[i]``: sequence i's group (its user); a batch
    never mixes groups, so a sequence's activations, to the last bit, depend only on its
    group's sequences (what makes a user's vectors the same in every part of a sharded
    experiment: the padded length of a batch changes the kernels' rounding)."""
    seqs = tokenize_pair_texts(lm, questions, answers, answer_tokenization)
    if any(len(ids) <= start for ids, start in seqs):
        bad = next(i for i, (ids, start) in enumerate(seqs) if len(ids) <= start)
        raise SteeringError(f"answer {bad} has no tokens: {answers[bad]!r}")
    if token_weights is not None:
        for i, ((ids, start), w) in enumerate(zip(seqs, token_weights)):
            if len(w) != len(ids) - start or sum(w) <= 0:
                raise SteeringError(f"token weights of sequence {i}: {len(w)} weights (sum "
                                    f"{sum(w)}) for {len(ids) - start} answer tokens")
    seqs = _fit_context(seqs, shape_of(lm.model).max_positions, overlength,
                        names or [f"sequence {i}" for i in range(len(seqs))])
    reads = {s: read_site(s, attn_read) for s in sites}
    keys = [(layer, r) for r in dict.fromkeys(reads.values())]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    by_group: dict[str, list[int]] = {}
    for i in order:  # each group longest first
        by_group.setdefault("" if groups is None else groups[i], []).append(i)
    batches = [rows[b:b + batch_size] for g in sorted(by_group) for rows in [by_group[g]]
               for b in range(0, len(rows), batch_size)]
    out: dict[str, torch.Tensor] = {}
    pad = lm.tokenizer.pad_token_id
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=not progress, leave=False)
    for rows in batches:
        ids, attn, answer = pad_batch(seqs, rows, pad)
        weights = answer.float() if token_weights is None else answer_weights(seqs, rows, token_weights)
        ctx = row_context(rows) if row_context else contextlib.nullcontext()
        with ctx as extra, capture(lm.model, keys, layers_path=layers_path,
                                   stop_early=stop_early) as acts:
            lm.model(input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device), use_cache=False,
                     **(extra or {}))
        for site, r in reads.items():
            a = acts[(layer, r)].float()  # means in fp32 whatever the model's dtype
            w = weights.to(a.device)[..., None]  # under a device map: the layer's device
            mean = (a * w).sum(1) / w.sum(1)
            if site not in out:
                out[site] = torch.empty((len(seqs), a.shape[-1]), dtype=torch.float32)
            out[site][rows] = mean.cpu()
        bar.update(len(rows))
    bar.close()
    return out


def _fit_context(seqs: list[tuple[list[int], int]], limit: int | None, overlength: str,
                 names: Sequence[str]) -> list[tuple[list[int], int]]:
    if overlength not in OVERLENGTH:
        raise SteeringError(f"generation.overlength={overlength!r}; expected one of {list(OVERLENGTH)}")
    out = []
    over = 0
    for (ids, start), name in zip(seqs, names):
        fitted = clip_token_sequence(ids, start, limit) if overlength == "truncate" else (
            (ids, start) if limit is None or len(ids) <= limit else None)
        if fitted is None:
            how = ("its answer alone has %d tokens" % (len(ids) - start) if overlength == "truncate"
                   else "set generation.overlength=truncate to drop question tokens from its middle")
            raise SteeringError(f"extraction: {name} has {len(ids)} tokens, more than the model's "
                                f"context of {limit}; {how}")
        over += fitted[0] is not ids
        out.append(fitted)
    if over:
        log.warning("extraction: %d sequence(s) longer than the context of %d tokens lost "
                    "question tokens from their middle", over, limit)
    return out


def pair_vectors(
    lm: LoadedModel, pairs: Sequence[Pair], layer: int, sites: Sequence[str], *,
    attn_read: str = "output", answer_tokenization: str = "separate", batch_size: int = 8,
    cache_dir: str | Path, layers_path: str = "", progress: bool = True,
    overlength: str = "error", row_context: Callable[[list[int]], ContextManager] | None = None,
    identities: Sequence[str] | None = None,
    chosen_weights: Sequence[Sequence[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """``{site: [len(pairs), H]}``, chosen minus rejected, loaded from the cache when the
    same model, layer, read mode, answer tokenization and pairs were extracted before.
    ``overlength``: a sequence longer than the model's context is an error naming the
    pair, or (``truncate``) loses question tokens from its middle. ``row_context(rows)``:
    the context a batch of pairs (indices into ``pairs``) is read in (a user's adapter);
    ``identities[i]``: what besides the text decides pair i's activations (the adapter's
    hash), part of the cache key (all "" or None: no entry in the key)."""
    for s in sites:
        if s not in SITES:
            raise SteeringError(f"unknown site {s!r}; expected one of {list(SITES)}")
    read_site("attn", attn_read)
    if answer_tokenization not in ANSWER_TOKENIZATIONS:
        raise SteeringError(f"steering.answer_tokenization={answer_tokenization!r}; expected one "
                            f"of {list(ANSWER_TOKENIZATIONS)}")
    # `separate` adds nothing to the key.
    join = "space" if answer_tokenization == "separate" else "joint"
    recipe = {"model": lm.fingerprint, "layer": layer, "sites": sorted(sites),
              "attn_read": attn_read, "answer_join": join, "mean": "answer_tokens",
              "batches": "per_user"}
    data_hash = content_hash([[p.prompt, p.chosen, p.rejected] for p in pairs])
    if identities is not None and any(identities):
        if len(identities) != len(pairs):
            raise SteeringError(f"{len(identities)} identities for {len(pairs)} pairs")
        recipe["identities"] = content_hash(list(identities))
    if chosen_weights is not None:  # SteerX: the chosen side's mean over selected tokens
        recipe["chosen_weights"] = content_hash([list(map(float, w)) for w in chosen_weights])
    path = Path(cache_dir) / "vectors" / f"{content_hash([recipe, data_hash])}.safetensors"
    cached = load_vectors(path)
    if cached is not None:
        log.info("loaded %d pair vectors at layer %d from %s", len(pairs), layer, path)
        return cached
    if not pairs:
        return {}
    qs = [p.prompt for p in pairs]
    common = dict(attn_read=attn_read, answer_tokenization=answer_tokenization,
                  batch_size=batch_size, layers_path=layers_path, progress=progress,
                  overlength=overlength, row_context=row_context, groups=[p.user for p in pairs])
    chosen = answer_means(lm, qs, [p.chosen for p in pairs], layer, sites, desc="extract chosen",
                          names=[f"the chosen side of the pair for item {p.item_id!r} of user "
                                 f"{p.user!r}" for p in pairs], token_weights=chosen_weights,
                          **common)
    rejected = answer_means(lm, qs, [p.rejected for p in pairs], layer, sites,
                            desc="extract rejected",
                            names=[f"the rejected side of the pair for item {p.item_id!r} of "
                                   f"user {p.user!r}" for p in pairs], **common)
    vectors = {s: chosen[s] - rejected[s] for s in sites}
    save_vectors(path, vectors, {**recipe, "answer_tokenization": answer_tokenization,
                                 "data_hash": data_hash, "n_pairs": len(pairs),
                                 "hidden_size": int(next(iter(vectors.values())).shape[1])})
    log.info("extracted %d pair vectors at layer %d into %s", len(pairs), layer, path)
    return vectors
