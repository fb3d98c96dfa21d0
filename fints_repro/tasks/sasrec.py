"""The benchmark's recommender: SASRec (Kang & McAuley 2018, self-attentive sequential
recommendation), with the parameter layout of the checkpoint PersonalWAB ships
(``recommender/checkpoint/pwab.pth``: the SASRec.pytorch layout, 50 hidden units, 2
blocks, 2 heads, sequences of 30), so that its ``state_dict`` loads as it is.

Inference as the benchmark runs it: the ASINs of the sequence mapped to item ids through
``1000_ids.json`` (unknown ASINs dropped; none left: no recommendation), the last 30
kept and left-padded with 0; the last position's features score every mapped item by
dot product with its embedding; the top k are the recommendation. The blocks follow that
implementation exactly, including its residual around the *normalised* query
(``Q + attention(Q, x, x)``) and a causal mask without a padding mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fints_repro.errors import ConfigError


class _FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout1 = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        h = self.dropout2(self.conv2(torch.relu(self.dropout1(self.conv1(x.transpose(1, 2))))))
        return h.transpose(1, 2) + x


class SASRec(nn.Module):
    def __init__(self, n_items: int, hidden: int = 50, blocks: int = 2, heads: int = 2,
                 maxlen: int = 30, dropout: float = 0.5):
        super().__init__()
        self.maxlen = maxlen
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(maxlen + 1, hidden, padding_idx=0)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.attention_layers = nn.ModuleList(nn.MultiheadAttention(hidden, heads, dropout)
                                              for _ in range(blocks))
        self.forward_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.forward_layers = nn.ModuleList(_FeedForward(hidden, dropout) for _ in range(blocks))
        self.last_layernorm = nn.LayerNorm(hidden, eps=1e-8)

    def features(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, T] item ids (0 = padding) -> [B, T, H]."""
        x = self.item_emb(seqs) * self.item_emb.embedding_dim ** 0.5
        pos = torch.arange(1, seqs.shape[1] + 1, device=seqs.device).expand_as(seqs) * (seqs != 0)
        x = self.emb_dropout(x + self.pos_emb(pos))
        t = seqs.shape[1]
        causal = ~torch.tril(torch.ones(t, t, dtype=torch.bool, device=seqs.device))
        for ln_a, attn, ln_f, ff in zip(self.attention_layernorms, self.attention_layers,
                                        self.forward_layernorms, self.forward_layers):
            x = x.transpose(0, 1)  # [T, B, H]: MultiheadAttention's default layout
            q = ln_a(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = (q + out).transpose(0, 1)
            x = ff(ln_f(x))
        return self.last_layernorm(x)


class SASRecRecommender:
    """``get_recommendations_by_history`` with a SASRec checkpoint and the benchmark's
    ASIN -> item id map; only mapped items are recommended."""

    def __init__(self, checkpoint: str | Path, item_ids: str | Path, maxlen: int = 30):
        try:
            self.ids: dict[str, int] = json.loads(Path(item_ids).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"dataset.pwab.sasrec_item_ids={item_ids}: cannot read it ({e})") from e
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a missing or damaged file, said as such
            raise ConfigError(f"dataset.pwab.sasrec_checkpoint={checkpoint}: cannot load it ({e})") from e
        n_items = state["item_emb.weight"].shape[0] - 1
        hidden = state["item_emb.weight"].shape[1]
        blocks = len({k.split(".")[1] for k in state if k.startswith("attention_layers.")})
        heads = 2  # not recorded in the state dict; the benchmark's model has 2
        self.model = SASRec(n_items, hidden, blocks, heads, maxlen).eval()
        self.model.load_state_dict(state)
        self.maxlen = maxlen
        self.asin_of = {v: k for k, v in self.ids.items()}
        self.candidates = torch.tensor(sorted(self.ids.values()))

    @torch.inference_mode()
    def recommend_many(self, sequences: Sequence[Sequence[str]], k: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in sequences]
        rows = []
        for i, seq in enumerate(sequences):
            mapped = [self.ids[a] for a in seq if a in self.ids][-self.maxlen:]
            if mapped:
                rows.append((i, [0] * (self.maxlen - len(mapped)) + mapped))
        if not rows:
            return out
        seqs = torch.tensor([r for _, r in rows])
        last = self.model.features(seqs)[:, -1]  # [B, H]
        scores = last @ self.model.item_emb(self.candidates).T  # [B, C]
        top = torch.topk(scores, min(k, len(self.candidates)), dim=1).indices
        for (i, _), idx in zip(rows, top):
            out[i] = [self.asin_of[int(self.candidates[j])] for j in idx]
        return out
