"""Steering vectors on disk: safetensors (one ``[N, H]`` tensor per site) with JSON
metadata (model, layer, sites, hidden size, recipe, data hash).

Written to a temporary file of its own and renamed (``fints_repro.cache.atomic_file``), so
a killed run never leaves a half-written store behind and two processes saving the same
vectors at once each rename a whole file. Files are ``0644``: a shared cache is readable by
every user. A file that cannot be read back (cut short, overwritten with garbage) is moved
aside to ``<name>.corrupt`` with a warning naming it, and the vectors are computed again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fints_repro.cache import atomic_file
from fints_repro.errors import CacheError

log = logging.getLogger(__name__)


def save_vectors(path: Path, vectors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_file(Path(path), "steering vectors") as tmp:
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(tmp),
                  metadata={"fints_repro": json.dumps(meta, sort_keys=True)})


def _read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file; raises on a file that is not a well-formed vector store."""
    with safe_open(str(path), framework="pt") as f:
        vectors = {k: f.get_tensor(k) for k in f.keys()}
    rows = {v.shape[0] for v in vectors.values() if v.dim() == 2}
    if any(v.dim() != 2 for v in vectors.values()) or len(rows) > 1:
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        raise ValueError(f"expected one [N, H] tensor per site with the same N, got {shapes}")
    return vectors


def _move_aside(path: Path, inode: int, reason: Exception) -> None:
    """Rename the unreadable ``path`` to ``<name>.corrupt`` (unless another process has
    already replaced it with a new file); a file that cannot be moved is a CacheError."""
    aside = path.with_name(path.name + ".corrupt")
    try:
        if os.stat(path).st_ino != inode:
            return  # rewritten meanwhile by another process: leave the new file alone
        os.replace(path, aside)
    except FileNotFoundError:
        return  # moved aside by another process
    except OSError as e:
        raise CacheError(
            f"steering vector file {path} is unreadable ({reason}) and cannot be moved aside "
            f"({e}); delete it (rm {path}) and run again: the vectors are computed again",
            path=str(path),
        ) from e
    log.warning("steering vector file %s is unreadable (%s): moved it to %s; the vectors are "
                "computed again", path, reason, aside)


def load_vectors(path: Path) -> dict[str, torch.Tensor] | None:
    """The vectors stored at ``path``; None when there are none, or when the file is
    damaged (it is then moved aside with a warning, and the caller computes them again)."""
    path = Path(path)
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return None
    try:
        return _read(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        _move_aside(path, inode, e)
        return None


def vector_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata a vector file was saved with; a damaged file is a CacheError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("fints_repro", "{}"))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CacheError(f"steering vector file {path} is unreadable ({e}); delete it (rm {path}): "
                         "the next run computes the vectors again", path=str(path)) from e
