"""Loader for the official LaMP-4 (news headline) and LaMP-5 (scholarly title) files.

The files of a split are found in the layout ``scripts/download_data.py`` writes
(``lamp4/{split}_questions.json``) or in the LaMP server's (``LaMP_4/{split}/...``); see
``lamp_candidates``.

``{split}_questions.json`` is a JSON list of ``{id, input, profile: [...], user_id?}``;
``{split}_outputs.json`` is ``{task, golds: [{id, output}]}``. A LaMP-4 profile item is
``{id, text, title}`` (article, headline), a LaMP-5 one ``{id, abstract, title}``
(abstract, title). Records are checked one by one; every error names the file and record.

The small readers and checkers here (``read_json``, ``require_str``, ``require_id``,
``parse_timestamp``) are shared with the LongLaMP loader.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import ConfigError, DataError, MissingDataError
from fints_repro.text import json_loads_valid

# task -> the profile item's input-side field; the output side is always "title".
LAMP_PROFILE_INPUT = {"lamp4": "text", "lamp5": "abstract"}

_YEAR = re.compile(r"^\d{4}$")


# The LaMP server's folder of each task (``LaMP_4/dev/dev_questions.json``, or under
# ``LaMP_4/new/`` as the user-based release sits on the server).
LAMP_SERVER_DIRS = {"lamp4": "LaMP_4", "lamp5": "LaMP_5"}


def lamp_candidates(root: Path, split: str, task: str | None = None) -> list[tuple[Path, Path]]:
    """Every place the questions and outputs files of ``split`` may be, in the order they
    are tried; ``root`` is the dataset folder (``dataset.path``, ``${data.root}/lamp4``).

    1. ``root/{split}_questions.json``: the layout ``scripts/download_data.py`` writes;
    2. ``root/{split}/{split}_questions.json``: ``root`` is the server's task folder;
    3. with ``task``: the server's layout beside ``root`` in the data root,
       ``LaMP_4/{split}/{split}_questions.json``, then ``LaMP_4/new/{split}/...``, and for
       ``dev`` the authors' ``LaMP_4/valid/dev_questions.json``.
    """
    root = Path(root)
    folders = [root, root / split]
    if task in LAMP_SERVER_DIRS:
        server = root.parent / LAMP_SERVER_DIRS[task]
        folders += [server / split, server / "new" / split]
        if split == "dev":  # the authors' layout: LaMP_4/valid/dev_questions.json
            folders.append(server / "valid")
    return [(f / f"{split}_questions.json", f / f"{split}_outputs.json") for f in folders]


def lamp_paths(root: Path, split: str, task: str | None = None) -> tuple[Path, Path]:
    """The questions and outputs files of ``split``: the first of ``lamp_candidates`` whose
    questions file exists, else the first (the layout ``scripts/download_data.py`` writes)."""
    candidates = lamp_candidates(root, split, task)
    return next((pair for pair in candidates if pair[0].is_file()), candidates[0])


def load_lamp(
    questions_path: str | Path, outputs_path: str | Path | None = None, *, task: str
) -> list[Sample]:
    """Load a LaMP-4 (``task="lamp4"``) or LaMP-5 (``"lamp5"``) split as samples.

    Targets come from ``outputs_path``; without it every target is None.
    """
    if task not in LAMP_PROFILE_INPUT:
        raise ConfigError(f"unknown LaMP task {task!r}; expected one of {sorted(LAMP_PROFILE_INPUT)}")
    hint = f"get the official files with `python scripts/download_data.py {task}`"
    qpath = Path(questions_path)
    records = read_json(qpath, hint=hint)
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of questions, got {type(records).__name__}", file=str(qpath))
    samples: list[Sample] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        sample = _question(record, index, file=str(qpath), input_field=LAMP_PROFILE_INPUT[task])
        if sample.id in seen:
            raise DataError(f"duplicate question id {sample.id!r}", file=str(qpath), record=sample.id)
        seen.add(sample.id)
        samples.append(sample)
    if outputs_path is None:
        return samples
    golds = _golds(Path(outputs_path), hint=hint)
    for gold_id in golds:
        if gold_id not in seen:
            raise DataError(
                f"output id {gold_id!r} has no question in {qpath}", file=str(outputs_path), record=gold_id
            )
    out = []
    for sample in samples:
        if sample.id not in golds:
            raise DataError(
                f"question {sample.id!r} has no gold output in {outputs_path}", file=str(qpath), record=sample.id
            )
        out.append(replace(sample, target=golds[sample.id]))
    return out


def _question(record: Any, index: int, *, file: str, input_field: str) -> Sample:
    """One question record -> Sample (target None; filled in from the outputs file)."""
    if not isinstance(record, dict):
        raise DataError(f"question is a {type(record).__name__}, not an object", file=file, record=index)
    if "id" not in record:
        raise DataError("question is missing field 'id'", file=file, record=index)
    qid = require_id(record, "id", file=file, record=index)
    text = require_str(record, "input", file=file, record=qid)
    profile = record.get("profile")
    if profile is None:
        raise DataError("question is missing field 'profile'", file=file, record=qid)
    if not isinstance(profile, list):
        raise DataError(f"field 'profile' is a {type(profile).__name__}, not a list", file=file, record=qid)
    history = tuple(
        _profile_item(item, j, file=file, record=qid, input_field=input_field) for j, item in enumerate(profile)
    )
    user = require_id(record, "user_id", file=file, record=qid) if record.get("user_id") is not None else qid
    return Sample(
        id=qid,
        user=user,
        input=text,
        target=None,
        history=history,
        timestamp=parse_timestamp(record.get("date"), file=file, record=qid, field="date"),
    )


def _profile_item(item: Any, j: int, *, file: str, record: str, input_field: str) -> HistoryItem:
    where = f"profile[{j}]"
    if not isinstance(item, dict):
        raise DataError(f"{where} is a {type(item).__name__}, not an object", file=file, record=record)
    if "id" not in item:
        raise DataError(f"{where} is missing field 'id'", file=file, record=record)
    return HistoryItem(
        id=require_id(item, "id", file=file, record=record, where=where),
        input=require_str(item, input_field, file=file, record=record, where=where),
        output=require_str(item, "title", file=file, record=record, where=where),
        timestamp=parse_timestamp(item.get("date"), file=file, record=record, field=f"{where}.date"),
    )


def _golds(path: Path, *, hint: str) -> dict[str, str]:
    """The outputs file as ``{question id: gold output}``."""
    data = read_json(path, hint=hint)
    golds = data.get("golds") if isinstance(data, dict) else None
    if not isinstance(golds, list):
        raise DataError("expected an object with a 'golds' list", file=str(path))
    out: dict[str, str] = {}
    for index, gold in enumerate(golds):
        if not isinstance(gold, dict) or "id" not in gold:
            raise DataError("gold is not an object with field 'id'", file=str(path), record=index)
        gid = require_id(gold, "id", file=str(path), record=index)
        if gid in out:
            raise DataError(f"duplicate output id {gid!r}", file=str(path), record=gid)
        out[gid] = require_str(gold, "output", file=str(path), record=gid)
    return out


def read_text(path: Path, *, hint: str) -> str:
    """A data file's text (UTF-8); a missing file raises MissingDataError with ``hint``, one
    that cannot be read (no permission, a folder) or is not UTF-8 a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingDataError(f"{path} not found; {hint}", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e}", file=str(path)) from e
    except OSError as e:
        raise DataError(f"cannot read the data file ({e.strerror or e}): it must be a file this "
                        "user may read; check its permissions", file=str(path)) from e


def read_json(path: Path, *, hint: str) -> Any:
    """Parse a JSON file; a missing file raises MissingDataError with ``hint``, an empty one
    (nothing but whitespace) or one that does not read a DataError that names it. Strings
    come out valid Unicode (an escaped lone surrogate becomes U+FFFD)."""
    text = read_text(path, hint=hint)
    if not text.strip():
        raise empty_file_error(path, hint=hint)
    try:
        return json_loads_valid(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}", file=str(path)) from e
    except RecursionError as e:
        raise DataError("invalid JSON: nested too deep to read", file=str(path)) from e


def empty_file_error(path: Path, *, hint: str) -> DataError:
    """The error for a data file with nothing in it (a download or copy cut short)."""
    size = path.stat().st_size
    what = "is empty (0 bytes)" if size == 0 else f"holds nothing but whitespace ({size} bytes)"
    return DataError(f"the data file {what}; a download or copy was probably cut short: "
                     f"delete it and {hint}", file=str(path))


def require_str(obj: dict[str, Any], key: str, *, file: str, record: str | int, where: str = "") -> str:
    """``obj[key]``, which must be a string."""
    name = f"{where}.{key}" if where else key
    if key not in obj or obj[key] is None:
        raise DataError(f"missing field '{name}'", file=file, record=record)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"field '{name}' is a {type(value).__name__}, not a string", file=file, record=record)
    return value


def require_id(obj: dict[str, Any], key: str, *, file: str, record: str | int, where: str = "") -> str:
    """``obj[key]`` as an id string; strings and integers are accepted."""
    value = obj.get(key)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str) and value:
        return value
    name = f"{where}.{key}" if where else key
    raise DataError(f"field '{name}' must be a non-empty string or an integer, got {value!r}", file=file, record=record)


def parse_timestamp(value: Any, *, file: str, record: str | int, field: str) -> float | None:
    """Seconds since the epoch (UTC) from an ISO date or a year; None for a missing value.

    A year ``Y`` (number or four-digit string) maps to 1 January ``Y``, so years and dates
    compare on one scale.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isnan(value):
            return None
        if float(value).is_integer() and 1 <= value <= 9999:
            return datetime(int(value), 1, 1, tzinfo=timezone.utc).timestamp()
    elif value is None:
        return None
    elif isinstance(value, str):
        text = value.strip()
        if _YEAR.match(text):
            return datetime(int(text), 1, 1, tzinfo=timezone.utc).timestamp()
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    raise DataError(f"field '{field}' is not an ISO date or a year: {value!r}", file=file, record=record)
