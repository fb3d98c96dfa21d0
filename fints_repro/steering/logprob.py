"""Answer-token log-probabilities, batched: log p(answer | question) summed over the answer
tokens (optionally weighted per token), on plain text, with or without steering vectors
(through ``steer``, so a vector that requires grad gets its gradient). What BiPO trains
on, and what a token-level causal effect is computed from.

Sequences are tokenised and laid out as extraction does it (``tokenize_pair_texts``:
question, then answer, ``separate`` or ``joint``; ``pad_batch``: right-padded), sorted by
length; token t of the answer is scored by the logits at position t - 1.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fints_repro.models.loading import LoadedModel
from fints_repro.steering.extract import pad_batch, tokenize_pair_texts
from fints_repro.steering.sites import SteeringError


def packed(lm: LoadedModel, questions: Sequence[str], answers: Sequence[str],
           mode: str = "separate") -> list[tuple[list[int], int]]:
    """(ids, answer start) per sequence; the question must give at least one token (the
    first answer token is scored from the position before it)."""
    seqs = tokenize_pair_texts(lm, questions, answers, mode)
    for i, (ids, start) in enumerate(seqs):
        if start < 1 or len(ids) <= start:
            raise SteeringError(f"sequence {i}: the question and the answer must each give a "
                                f"token (question {questions[i][:40]!r}, answer {answers[i][:40]!r})")
    return seqs


def _token_logp(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: log p(ids[t] | ids[:t]) for t = 1 .. T-1, in fp32 on the device of the
    logits (under a device map, the output head's)."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    targets = ids[:, 1:, None].to(logits.device)
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets)[..., 0]


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor,
                      answer: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]``: sum over answer positions t of ``w_t * log p(ids[t] | ids[:t])``
    (``weights`` ``[B, T]``, default 1). Differentiable in whatever the forward depends on."""
    dev = next(model.parameters()).device
    ids, attn, answer = ids.to(dev), attn.to(dev), answer.to(dev)
    logp = _token_logp(model, ids, attn)
    w = answer[:, 1:].to(logp.device, torch.float32)
    if weights is not None:
        w = w * weights.to(logp.device, torch.float32)[:, 1:]
    return (logp * w).sum(-1)


@torch.no_grad()
def token_logprobs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
                   batch_size: int = 8) -> list[torch.Tensor]:
    """Per sequence, ``log p(y_t | prompt, y_<t)`` of each answer token (float32, CPU),
    prompt and ``" " + answer`` tokenised apart, so the answer's tokens are the same
    whatever the prompt (what a token-level effect of the prompt compares)."""
    return _answer_logps(lm, packed(lm, prompts, answers, "separate"), batch_size)


@torch.no_grad()
def mean_token_nll(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
                   batch_size: int = 8) -> list[float]:
    """Per sequence, the mean over the answer's tokens of ``-log p(y_t | prompt, y_<t)``,
    prompt and answer tokenised as one string (``joint``: the answer as a model that was
    given the rendered prompt generated it)."""
    seqs = packed(lm, prompts, answers, "joint")
    return [-float(t.mean()) for t in _answer_logps(lm, seqs, batch_size)]


def _answer_logps(lm: LoadedModel, seqs: Sequence[tuple[list[int], int]], batch_size: int
                  ) -> list[torch.Tensor]:
    """Per (ids, answer start), the log-probabilities of its answer tokens (float32, CPU),
    longest sequences batched first."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    dev = next(lm.model.parameters()).device
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        ids, attn, _ = pad_batch(seqs, rows, lm.tokenizer.pad_token_id)
        logp = _token_logp(lm.model, ids.to(dev), attn.to(dev)).cpu()
        for r, i in enumerate(rows):
            seq, start = seqs[i]
            out[i] = logp[r, start - 1:len(seq) - 1]
    return out  # type: ignore[return-value]

