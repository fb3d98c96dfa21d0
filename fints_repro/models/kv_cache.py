"""A KV cache for ``generate`` that appends in place.

transformers' ``DynamicCache`` appends each decoding step with ``torch.cat``, copying the
whole cache of every layer at every step: O(T) memory traffic per token. On the demo's
RAG prompts (about 540 tokens, batch 8) that copy is a large share of a decoding step
on a CPU. :class:`ReservedLayer` is a ``DynamicLayer`` that keeps its keys and values in
storage reserved for the tokens still to come (``reserve``, set to ``max_new_tokens``)
and exposes the filled prefix as a view, so a step writes one position. Everything else
is ``DynamicCache``'s: the same masks, the same attention inputs (values and shapes; the
views are strided), and cropping, beam reordering or batch selection (which replace the
tensors; the next append takes them over).
"""

from __future__ import annotations

import torch
from torch import nn

try:  # transformers >= 5: caches made of per-layer objects
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: plain DynamicCache
    DynamicCache = DynamicLayer = None


_Base = DynamicLayer if DynamicLayer is not None else object


class ReservedLayer(_Base):
    """``DynamicLayer`` whose appends write into storage reserved ahead."""

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.reserve = reserve
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _holds_prefix(self) -> bool:
        """Are ``keys``/``values`` still the prefix views of the reserved storage? (Cropping
        keeps them so; reordering, selection and reset replace them.)"""
        k, v = self.keys, self.values
        return (self._k is not None and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
                and k.dim() == self._k.dim() and k.data_ptr() == self._k.data_ptr()
                and v.data_ptr() == self._v.data_ptr() and k.stride() == self._k.stride()
                and v.stride() == self._v.stride() and k.shape[:-2] == self._k.shape[:-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if not (self._holds_prefix() and new <= self._k.shape[-2]
                and key_states.shape[:-2] == self._k.shape[:-2]):
            cap = new + self.reserve
            k = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
            if old:
                k[..., :old, :].copy_(self.keys)
                v[..., :old, :].copy_(self.values)
            self._k, self._v = k, v
        self._k[..., old:new, :].copy_(key_states)
        self._v[..., old:new, :].copy_(value_states)
        self.keys, self.values = self._k[..., :new, :], self._v[..., :new, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def reserved_cache(model: nn.Module, reserve: int):
    """A ``DynamicCache`` for ``model`` whose full-attention layers are
    :class:`ReservedLayer`\\ s (sliding-window layers keep their own kind), or None where
    this transformers has no per-layer caches (``generate`` then makes its default)."""
    if DynamicCache is None:
        return None
    cache = DynamicCache(config=model.config)  # what generate itself would make
    if not cache.layers:
        return None
    cache.layers = [ReservedLayer(reserve) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
