"""Where steering reads and writes, for any decoder-only transformers model.

For decoder layer *l* a *site* is one module whose forward output is the quantity:

- ``resid``: the decoder layer itself (its output is the residual stream after the layer);
- ``attn``: the self-attention module (its output, before the residual add);
- ``mlp``: the MLP module (its output, before the residual add);
- ``attn_residual`` (read only): the *input* of the pre-MLP norm, i.e. layer input +
  attention output — what the Fints authors' code stores as its "attn" activation.

The decoder layers are found generically (the ``nn.ModuleList`` whose length is the
config's layer count), with an explicit table of known paths as fallback and
``model.layers_path`` in the model config as an override. Inside a layer, attention and
MLP modules are looked up by the names transformers uses (table below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fints_repro.errors import FintsError

SITES = ("resid", "attn", "mlp")
READ_SITES = SITES + ("attn_residual",)

# Known decoder-layer paths, tried in order when generic discovery is ambiguous.
LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Gemma2/3, Phi-3, SmolLM
    "model.language_model.layers",  # Gemma3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)
# Inside a decoder layer: (attention, MLP, pre-MLP norm) child names, first match wins.
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "fc2")  # OPT has no MLP module: its fc2 output is the MLP output
PRE_MLP_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2",
                      "final_layer_norm")


class SteeringError(FintsError, ValueError):
    """A steering request that cannot be carried out (bad layer, site, vector)."""


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) else None


def _n_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def decoder_layers(model: nn.Module, override: str = "") -> nn.ModuleList:
    if override:
        found = _get_path(model, override)
        if not isinstance(found, nn.ModuleList):
            raise SteeringError(f"model.layers_path={override!r} is not a ModuleList in "
                                f"{type(model).__name__}")
        return found
    n = _n_layers(model)
    candidates = [m for _, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    if len(candidates) == 1:
        return candidates[0]
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise SteeringError(
        f"cannot find the decoder layers of {type(model).__name__}; set model.layers_path "
        "(e.g. model.layers) in the model config"
    )


def layers_owner(model: nn.Module, layers_path: str = "") -> nn.Module:
    """The module whose forward runs the decoder layers: the parent of their ModuleList
    (LlamaModel, GPT2Model, OPTDecoder, Gemma3's language model...).

    Every forward call of the layers goes through it, with the call's input_ids (or
    inputs_embeds), attention mask and past_key_values, while wrappers around it can be
    bypassed: ``PeftModel.generate`` calls the wrapped model's ``generate``, so a hook on
    the PEFT wrapper never fires."""
    layers = decoder_layers(model, layers_path)
    for mod in model.modules():
        if any(child is layers for child in mod.children()):
            return mod
    raise SteeringError(f"the decoder layers of {type(model).__name__} have no parent module")


def _child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise SteeringError(f"no {what} module in {type(layer).__name__} (looked for {names})")


@dataclass(frozen=True)
class Site:
    layer: int
    site: str


def site_module(model: nn.Module, layer: int, site: str, layers_path: str = "") -> nn.Module:
    """The module whose output (``attn_residual``: whose input) is ``site`` at ``layer``."""
    layers = decoder_layers(model, layers_path)
    check_site(layer, site, len(layers), allowed=READ_SITES)
    block = layers[layer]
    if site == "resid":
        return block
    if site == "attn":
        return _child(block, ATTN_NAMES, "attention")
    if site == "mlp":
        return _child(block, MLP_NAMES, "MLP")
    return _child(block, PRE_MLP_NORM_NAMES, "pre-MLP norm")


def check_site(layer: int, site: str, n_layers: int, allowed: tuple[str, ...] = SITES) -> None:
    if site not in allowed:
        raise SteeringError(f"unknown site {site!r}; expected one of {list(allowed)}")
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise SteeringError(f"layer {layer} is outside the model (0..{n_layers - 1})")


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return int(model.get_input_embeddings().weight.shape[1])


def default_layer(model: nn.Module, layers_path: str = "") -> int:
    """The mid layer Fints steers by default: 2/3 of the depth (20 of 32 for Llama-3.1-8B
    rounds to 21; the paper's 20 is `steering.layer=20`)."""
    return round(2 * len(decoder_layers(model, layers_path)) / 3)


def first_tensor(output: object) -> torch.Tensor:
    """A module's main output, whether it returns a tensor or a tuple (hidden, extras...)."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


def replace_first(output: object, new: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new
