"""Steering vectors on disk: safetensors (one ``[N, H]`` tensor per site) with JSON
metadata (model, layer, sites, hidden size, recipe, data hash). Written to a temporary
file and renamed, so a killed run never leaves a half-written store behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_vectors(path: Path, vectors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in vectors.items()}, str(tmp),
              metadata={"fints_repro": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def load_vectors(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def vector_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("fints_repro", "{}"))
