"""Two context managers on removable forward hooks (modules are never replaced, so PEFT
wrappers and other hooks keep working), both leaving the model exactly as they found it,
also after an exception:

    with capture(model, [(layer, "attn"), (layer, "mlp")]) as acts:
        model(**batch)
    acts[(layer, "attn")]                       # Tensor[B, T, H]

    with steer(model, {(layer, "attn"): v_attn, (layer, "mlp"): v_mlp}, positions="all"):
        model.generate(**batch)

A vector is ``[H]`` (every row) or ``[B, H]`` (one per row of the batch); one that
requires grad stays in the autograd graph. ``positions``: ``all`` (prompt and generated
tokens: Fints), ``prompt``, ``generated``, or a ``[B, T]`` mask / weight tensor over the
positions of the full sequence (see ``steer``). Pad positions (attention mask 0, e.g. left
padding) are never changed. Under the KV cache each decoding step is one more forward
call whose positions are generated tokens; a pre-hook on the module that runs the decoder
layers (``sites.layers_owner``: LlamaModel, GPT2Model..., which every call goes through,
also under a PEFT wrapper whose own forward ``generate`` bypasses) reads each call's
attention mask and works out, once per call, which positions of that call to steer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

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
    layers_owner,
    replace_first,
    site_module,
)

SiteKey = tuple[int, str]
POSITIONS = ("all", "prompt", "generated")
Positions = Union[str, torch.Tensor]


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
    owner = layers_owner(model, layers_path)
    handles = [owner.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True)]
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
    """Which positions of the current forward call to steer: ``mask`` ``[B|1, T_new]``
    (bool flags, or float weights for a weight tensor) or None (all positions)."""

    positions: Positions
    batch: int | None = None  # None until the pre-hook has seen a forward call
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
    """Forward pre-hook (with kwargs) on ``layers_owner(model)``: this call's positions."""

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
        if isinstance(state.positions, torch.Tensor):
            state.skip, state.mask = False, _weights_of_call(state.positions, state.batch,
                                                             t_total - t_new, t_total, not_pad)
            return None
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


def _weights_of_call(weights: torch.Tensor, batch: int, start: int, end: int,
                     not_pad: torch.Tensor | None) -> torch.Tensor:
    """Columns ``start:end`` (this call's absolute positions) of a ``[B|1, T]`` position
    mask, zero (False) at pad positions; differentiable in ``weights``."""
    if weights.shape[0] not in (1, batch):
        raise SteeringError(f"position mask has {weights.shape[0]} rows; the forward call has "
                            f"{batch} (one row per row of the batch, or one for all)")
    if weights.shape[1] < end:
        raise SteeringError(
            f"position mask covers positions 0..{weights.shape[1] - 1}; this forward call "
            f"covers positions {start}..{end - 1} (under the KV cache a mask must cover the "
            "prompt and every generated token)")
    w = weights[:, start:end]
    if not_pad is None:
        return w
    not_pad = not_pad.to(w.device)
    if w.dtype == torch.bool:
        return w & not_pad
    return torch.where(not_pad, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _adder(vector: torch.Tensor, state: _CallState):
    """Adds ``vector`` (``[1, 1, H]`` or ``[B, 1, H]``) at the chosen positions, times
    their weight for a weight tensor."""

    def hook(module, args, output):
        if state.batch is None:
            raise SteeringError(
                f"{type(module).__name__} ran, but no forward call of the module that holds "
                "the decoder layers did (set model.layers_path to the layers that run)")
        if state.skip:
            return None
        out = first_tensor(output)
        h = _as_3d(out, state.batch)
        if vector.shape[0] not in (1, h.shape[0]):
            raise SteeringError(
                f"steering vector batch {vector.shape[0]} does not match the activation batch "
                f"{h.shape[0]} (one vector per row, or one for all)"
            )
        # In the activation's dtype and on its device at the add: under a device map the
        # layers (and the masks computed at the input) may sit on different devices.
        v = vector.to(device=h.device, dtype=h.dtype)
        if state.mask is not None:
            v = v * state.mask[..., None].to(device=h.device, dtype=h.dtype)
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
        if not torch.isfinite(v.detach()).all():  # detached: the check is no graph node
            raise SteeringError(f"vector at {(layer, site)} contains NaN or inf")


def _position_weights(positions: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A checked ``[B|1, T]`` position mask on the model's device: bool stays bool, any
    other dtype becomes float weights in the model's dtype (kept in the graph if it
    requires grad)."""
    if positions.dim() != 2:
        raise SteeringError(f"position mask has shape {tuple(positions.shape)}; expected "
                            "[batch, seq_len] (or [1, seq_len])")
    if positions.is_complex():
        raise SteeringError("position mask is complex; expected bool or real weights")
    w = positions if positions.requires_grad else positions.detach()
    if w.dtype == torch.bool:
        return w.to(param.device)
    if not torch.isfinite(w.detach()).all():
        raise SteeringError("position mask contains NaN or inf")
    dtype = param.dtype if param.is_floating_point() else torch.float32
    return w.to(device=param.device, dtype=dtype)


@contextlib.contextmanager
def steer(
    model: nn.Module,
    vectors: Mapping[SiteKey, torch.Tensor],
    positions: Positions = "all",
    *,
    layers_path: str = "",
) -> Iterator[None]:
    """Add ``vectors[(layer, site)]`` to that site's output inside the block.

    ``model`` may be a bare transformers model or a wrapper around one (a PEFT model):
    the hooks go on its decoder layers and on the module that runs them, which every
    forward call and ``generate`` step goes through.

    A vector is ``[H]`` (every row) or ``[B, H]`` (one per row). One that requires grad
    is added through differentiable ops (cast to the model's dtype and device only where
    they differ), so a ``loss.backward()`` on outputs computed in the block fills its
    ``.grad``; one that does not is detached, as before.

    ``positions`` says where, per forward call:

    - ``"all"``: every position, prompt and generated;
    - ``"prompt"``: the positions of the call that starts a sequence (the prompt pass,
      with nothing cached before it);
    - ``"generated"``: every later position: the decoding steps under the KV cache
      (nothing in a single forward pass);
    - a tensor ``[B, T]`` (or ``[1, T]`` for every row), bool (steer or not) or real
      (the vector times that weight; integers are weights too), indexed by the absolute
      position in the full sequence, left pads included: a forward call whose inputs are
      positions ``past_length .. past_length + T_new - 1`` (``past_length`` = 0 without a
      KV cache, else the cached length; with a 2-D attention mask, its length minus
      ``T_new``) reads columns ``past_length .. past_length + T_new - 1`` of the mask. A
      call beyond its last column raises SteeringError, so under ``generate`` it must
      cover the prompt and every generated token. Weights that require grad stay in the
      graph.

    Pad positions (attention mask 0) are never changed, whatever ``positions`` says.
    """
    param = next(model.parameters())
    if isinstance(positions, torch.Tensor):
        positions = _position_weights(positions, param)
    elif positions not in POSITIONS:
        raise SteeringError(f"positions={positions!r}; expected one of {list(POSITIONS)} "
                            "or a [batch, seq_len] tensor")
    validate_vectors(model, vectors, layers_path)
    state = _CallState(positions)
    handles = []
    try:
        owner = layers_owner(model, layers_path)
        handles.append(owner.register_forward_pre_hook(_model_pre_hook(state), with_kwargs=True))
        for (layer, site), v in vectors.items():
            src = v if v.requires_grad else v.detach()
            mod = site_module(model, layer, site, layers_path)
            # Cast once to the module's own weights (under a device map, not the first
            # parameter's device; offloaded weights sit on "meta": the add moves it); the
            # add casts to the activation, a no-op when they match.
            where = next(mod.parameters(), param)
            v3 = src.to(device=src.device if where.device.type == "meta" else where.device,
                        dtype=where.dtype if where.is_floating_point() else src.dtype)
            v3 = v3.reshape(-1, 1, v.shape[-1])
            handles.append(mod.register_forward_hook(_adder(v3, state)))
        yield
    finally:
        for h in handles:
            h.remove()
