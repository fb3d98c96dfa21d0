"""Two context managers on removable forward hooks (modules are never replaced, so PEFT
wrappers and other hooks keep working), both leaving the model exactly as they found it,
also after an exception:

    with capture(model, [(layer, "attn"), (layer, "mlp")]) as acts:
        model(**batch)
    acts[(layer, "attn")]                       # Tensor[B, T, H]

    with steer(model, {(layer, "attn"): v_attn, (layer, "mlp"): v_mlp}, positions="all"):
        model.generate(**batch)

A vector is ``[H]`` (every row) or ``[B, H]`` (one per row of the batch). ``positions``:
``all`` (prompt and generated tokens: Fints), ``prompt`` or ``generated``. Pad positions
(attention mask 0, e.g. left padding) are never changed. Under the KV cache each decoding
step is one more forward call whose positions are generated tokens; a pre-hook on the
model reads each call's attention mask and works out, once per call, which positions of
that call to steer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from fints_repro.steering.sites import (
    READ_SITES,
    SITES,
    SteeringError,
    check_site,
    decoder_layers,
    first_tensor,
    hidden_size,
    replace_first,
    site_module,
)

SiteKey = tuple[int, str]
POSITIONS = ("all", "prompt", "generated")


class _StopForward(Exception):
    """Raised by capture(stop_early=True) after the deepest site: the rest of the model
    is not run."""


@contextlib.contextmanager
def capture(
    model: nn.Module, sites: Sequence[SiteKey], *, layers_path: str = "", stop_early: bool = False
) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """Record each site's activation ``[B, T, H]`` of the forward pass run in the block.

    ``stop_early`` ends the forward pass right after the deepest requested layer (the
    block's ``model(...)`` call then returns nothing; put only the forward call in it).
    """
    n_layers = len(decoder_layers(model, layers_path))
    for layer, site in sites:
        check_site(layer, site, n_layers, allowed=READ_SITES)
    acts: dict[SiteKey, torch.Tensor] = {}
    deepest = max((layer for layer, _ in sites), default=-1)
    state = _CallState("all")
    handles = [model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True)]
    try:
        for key in dict.fromkeys(sites):
            mod = site_module(model, key[0], key[1], layers_path)
            if key[1] == "attn_residual":
                handles.append(mod.register_forward_pre_hook(_input_recorder(acts, key, state)))
            else:
                handles.append(mod.register_forward_hook(_output_recorder(acts, key, state)))
        if stop_early and deepest >= 0:
            last = decoder_layers(model, layers_path)[deepest]
            handles.append(last.register_forward_hook(_stopper))
        try:
            yield acts
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


def _as_3d(h: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, T, H]`` view of an activation; some modules (OPT's fc2) work on ``[B*T, H]``."""
    return h if h.dim() == 3 else h.view(batch, -1, h.shape[-1])


def _output_recorder(acts: dict, key: SiteKey, state: "_CallState"):
    def hook(module, args, output):
        acts[key] = _as_3d(first_tensor(output), state.batch).detach()

    return hook


def _input_recorder(acts: dict, key: SiteKey, state: "_CallState"):
    def hook(module, args):
        acts[key] = _as_3d(args[0], state.batch).detach()

    return hook


def _stopper(module, args, output):
    raise _StopForward


@dataclass
class _CallState:
    """Which positions of the current forward call to steer: ``mask[B, T_new]`` or None
    (all positions)."""

    positions: str
    batch: int = 1
    prompt_len: int = 0
    mask: torch.Tensor | None = None
    skip: bool = False  # nothing to steer in this call


def _past_length(past) -> int:
    return int(past.get_seq_length()) if hasattr(past, "get_seq_length") else 0


def _not_pad_from_4d(mask, start: int, end: int) -> torch.Tensor | None:
    """``[B, end - start]`` non-pad flags of this call's positions from a prepared 4-D mask
    ``[B, 1|heads, T_new, keys]`` (static caches get one): the keys the call's last query
    may attend. That query is never a pad (left padding), and reading its row rather than
    the diagonal stays right where fully masked pad rows were unmasked for the kernel."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    row = mask[:, 0, -1, start:end]
    return row if row.dtype == torch.bool else row == 0


def _model_pre_hook(state: _CallState):
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        state.batch, t_new = (ids if ids is not None else embeds).shape[:2]
        attn = kwargs.get("attention_mask")
        if isinstance(attn, dict):  # per attention type (e.g. full and sliding layers)
            attn = attn.get("full_attention", next(iter(attn.values()), None))
        if isinstance(attn, torch.Tensor) and attn.dim() == 2:
            t_total = attn.shape[1]
            not_pad = attn[:, t_total - t_new:].bool()
        else:
            t_total = _past_length(kwargs.get("past_key_values")) + t_new
            not_pad = _not_pad_from_4d(attn, t_total - t_new, t_total)
        if t_total == t_new:  # a new sequence: everything in this call is prompt
            state.prompt_len = t_total
        is_prompt = torch.arange(t_total - t_new, t_total) < state.prompt_len
        if state.positions == "all":
            chosen = None
        else:
            want = is_prompt if state.positions == "prompt" else ~is_prompt
            if not want.any():
                state.skip, state.mask = True, None
                return None
            chosen = want.to(not_pad.device if not_pad is not None else "cpu")[None, :]
        if not_pad is not None:
            chosen = not_pad if chosen is None else (not_pad & chosen)
        state.skip = False
        state.mask = None if chosen is None or bool(chosen.all()) else chosen
        return None

    return hook


def _adder(vector: torch.Tensor, state: _CallState):
    """Adds ``vector`` (``[1, 1, H]`` or ``[B, 1, H]``) at the chosen positions."""

    def hook(module, args, output):
        if state.skip:
            return None
        out = first_tensor(output)
        h = _as_3d(out, state.batch)
        if vector.shape[0] not in (1, h.shape[0]):
            raise SteeringError(
                f"steering vector batch {vector.shape[0]} does not match the activation batch "
                f"{h.shape[0]} (one vector per row, or one for all)"
            )
        v = vector if state.mask is None else vector * state.mask[..., None].to(h.dtype)
        return replace_first(output, (h + v).view(out.shape))

    return hook


def validate_vectors(
    model: nn.Module, vectors: Mapping[SiteKey, torch.Tensor], layers_path: str = ""
) -> None:
    n_layers = len(decoder_layers(model, layers_path))
    h = hidden_size(model)
    for (layer, site), v in vectors.items():
        check_site(layer, site, n_layers, allowed=SITES)
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or v.shape[-1] != h:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise SteeringError(f"vector at {(layer, site)} has shape {shape}; expected [{h}] "
                                f"or [batch, {h}]")
        if not torch.isfinite(v).all():
            raise SteeringError(f"vector at {(layer, site)} contains NaN or inf")


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: Mapping[SiteKey, torch.Tensor],
    positions: str = "all",
    *,
    layers_path: str = "",
) -> Iterator[None]:
    """Add ``vectors[(layer, site)]`` to that site's output inside the block."""
    if positions not in POSITIONS:
        raise SteeringError(f"positions={positions!r}; expected one of {list(POSITIONS)}")
    validate_vectors(model, vectors, layers_path)
    param = next(model.parameters())
    state = _CallState(positions)
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True))
        for (layer, site), v in vectors.items():
            v3 = v.detach().to(device=param.device, dtype=param.dtype).reshape(-1, 1, v.shape[-1])
            mod = site_module(model, layer, site, layers_path)
            handles.append(mod.register_forward_hook(_adder(v3, state)))
        yield
    finally:
        for h in handles:
            h.remove()
