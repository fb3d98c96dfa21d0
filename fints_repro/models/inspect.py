"""What can be known of a model from its config alone, before its weights are loaded: the
number of decoder layers (to check ``steering.layer`` at start-up) and the context length
(to check prompt lengths before any model time)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fints_repro.config import ModelConfig

log = logging.getLogger(__name__)

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int | None
    max_positions: int | None


def _first_int(cfg: Any, keys: tuple[str, ...]) -> int | None:
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in keys:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def shape_of(model: Any) -> ModelShape:
    """From a loaded model's ``config``."""
    return ModelShape(_first_int(model.config, _LAYER_KEYS), _first_int(model.config, _CONTEXT_KEYS))


def _converted_shape(cfg: ModelConfig, cache_dir: str | Path) -> ModelShape:
    """A GGUF model's shape from its converted safetensors folder, when it was converted
    before (reading the GGUF's own header parses its whole vocabulary: seconds)."""
    import json

    found = sorted(Path(cache_dir, "models").glob(f"{cfg.name}-*/config.json"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        return ModelShape(None, None)
    return shape_of(type("M", (), {"config": json.loads(found[-1].read_text())}))


def shape_from_config(cfg: ModelConfig, cache_dir: str | Path) -> ModelShape:
    """The model's shape without loading weights; unknown fields are None (e.g. a hub
    model that is not reachable from here: the checks then run after the load)."""
    try:
        if cfg.source == "tiny_random":
            from fints_repro.models.tiny import tiny_config

            return shape_of(type("M", (), {"config": tiny_config(cfg.arch, **dict(cfg.arch_kwargs))}))
        if cfg.source == "gguf_wheel":
            return _converted_shape(cfg, cache_dir)
        if cfg.source in ("hub", "local"):
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(cfg.id, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
            return shape_of(type("M", (), {"config": hf}))
    except Exception as e:  # the load itself reports what is wrong, with its own message
        log.debug("model shape of %s not known before loading: %s", cfg.name, e)
    return ModelShape(None, None)
