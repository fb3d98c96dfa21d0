"""Loader for LongLaMP abstract generation (``abstract_generation_user`` / ``_temporal``).

A row is ``{name, input, output, profile: [{id?, title, abstract, year?|date?}]}``: ``name``
is the author (the user), ``input`` asks for the abstract of a titled paper, ``output`` is
the author's abstract. Rows come from ``.parquet`` (the Hugging Face files), ``.json`` (a
list) or ``.jsonl`` (one row a line, as ``scripts/download_data.py`` writes them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fints_repro.data.lamp import (empty_file_error, parse_timestamp, read_json, read_text, require_id,
                                  require_str)
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.text import json_loads_valid
from fints_repro.errors import DataError, MissingDataError

_HINT = "get it with `python scripts/download_data.py longlamp_abstract --split <split>`"


def load_longlamp_abstract(path: str | Path) -> list[Sample]:
    """Load one LongLaMP abstract-generation split as samples (user = the author's name)."""
    path = Path(path)
    samples: list[Sample] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(_rows(path)):
        sample = _row(row, index, where, file=str(path))
        if sample.id in seen:
            raise DataError(f"duplicate sample id {sample.id!r}", file=str(path), record=sample.id)
        seen.add(sample.id)
        samples.append(sample)
    return samples


def _rows(path: Path) -> list[tuple[str | int, Any]]:
    """The file's rows, each with how an error should point at it (row index or line)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            empty = path.stat().st_size == 0
        except FileNotFoundError:
            raise MissingDataError(f"{path} not found; {_HINT}", file=str(path)) from None
        if empty:
            raise empty_file_error(path, hint=_HINT)
        return list(enumerate(_read_parquet(path)))
    if suffix == ".json":
        rows = read_json(path, hint=_HINT)
        if not isinstance(rows, list):
            raise DataError(f"expected a JSON list of rows, got {type(rows).__name__}", file=str(path))
        return list(enumerate(rows))
    if suffix == ".jsonl":
        lines = read_text(path, hint=_HINT).split("\n")  # not splitlines: U+2028 may sit in a string
        if not any(line.strip() for line in lines):
            raise empty_file_error(path, hint=_HINT)
        out: list[tuple[str | int, Any]] = []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    out.append((f"line {n}", json_loads_valid(line)))
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DataError(f"invalid JSON: {e}", file=str(path), record=f"line {n}") from e
        return out
    raise DataError("unsupported file type; expected .parquet, .json or .jsonl", file=str(path))


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError as e:
        raise DataError("reading .parquet needs pyarrow (`pip install pyarrow`)", file=str(path)) from e
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"unreadable parquet file: {e}", file=str(path)) from e
    return frame.to_dict("records")


def _row(row: Any, index: int, where: str | int, *, file: str) -> Sample:
    """One row -> Sample; ``where`` locates the row until its id is known."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not an object", file=file, record=where)
    name = require_str(row, "name", file=file, record=where)
    sid = require_id(row, "id", file=file, record=where) if _present(row.get("id")) else f"{name}-{index}"
    profile = row.get("profile")
    if isinstance(profile, np.ndarray):  # parquet list columns come back as arrays
        profile = profile.tolist()
    if profile is None:
        raise DataError("row is missing field 'profile'", file=file, record=sid)
    if not isinstance(profile, list):
        raise DataError(f"field 'profile' is a {type(profile).__name__}, not a list", file=file, record=sid)
    output = row.get("output")
    return Sample(
        id=sid,
        user=name,
        input=require_str(row, "input", file=file, record=sid),
        target=require_str(row, "output", file=file, record=sid) if output is not None else None,
        history=tuple(_profile_item(item, j, file=file, record=sid) for j, item in enumerate(profile)),
        timestamp=_timestamp(row, file=file, record=sid, where=""),
    )


def _profile_item(item: Any, j: int, *, file: str, record: str) -> HistoryItem:
    where = f"profile[{j}]"
    if not isinstance(item, dict):
        raise DataError(f"{where} is a {type(item).__name__}, not an object", file=file, record=record)
    title = require_str(item, "title", file=file, record=record, where=where)
    abstract = require_str(item, "abstract", file=file, record=record, where=where)
    if _present(item.get("id")):
        item_id = require_id(item, "id", file=file, record=record, where=where)
    else:  # stable across the rows of one author, so sparsity picks the same papers
        item_id = "p" + hashlib.sha1(f"{title}\n{abstract}".encode()).hexdigest()[:12]
    return HistoryItem(
        id=item_id,
        input=title,
        output=abstract,
        timestamp=_timestamp(item, file=file, record=record, where=where),
    )


def _timestamp(obj: dict[str, Any], *, file: str, record: str, where: str) -> float | None:
    """From ``year``, else ``date``; None when neither is there."""
    for key in ("year", "date"):
        if _present(obj.get(key)):
            return parse_timestamp(obj[key], file=file, record=record, field=f"{where}.{key}" if where else key)
    return None


def _present(value: Any) -> bool:
    """False for None and for the NaN that pandas puts in an absent column."""
    return value is not None and not (isinstance(value, float) and value != value)
