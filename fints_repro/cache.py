"""On-disk caches keyed by content hash: every model-time stage (generations, contrastive
pairs, steering vectors) is stored under a key computed from what it was made from, so a
rerun or a sweep job reuses it and a killed run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence


def content_hash(obj: Any, n: int = 16) -> str:
    """Stable short hash of JSON-able content (dict keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def read_jsonl_lenient(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file that a killed run may have cut short: a broken last line is
    dropped (its sample is generated again), never fatal."""
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _write_rows(f, rows: Sequence[dict[str, Any]]) -> None:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows and flush them to disk (a kill loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        _write_rows(f, rows)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the file with these rows: written beside it, then renamed."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        _write_rows(f, rows)
    os.replace(tmp, path)


class GenerationStore:
    """Append-only JSONL of generations keyed by prompt hash, one file per
    (model, decoding, batching, steering) fingerprint."""

    def __init__(self, path: Path):
        self.path = path
        self.items: dict[str, str] = {r["key"]: r["generation"] for r in read_jsonl_lenient(path)}

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, [{"key": k, "generation": g} for k, g in pairs])
        self.items.update(pairs)
