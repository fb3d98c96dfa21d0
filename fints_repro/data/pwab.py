"""PersonalWAB single-turn function calling (HongruCai/PersonalWAB; data CC BY-NC 4.0).

The official files, each validated record by record (errors name the file and record):

- ``user_instructions.json``: ``{"train": [...], "test": [...]}``, each task
  ``{user_id, task, target: {product_info, review}, timestamp, type}`` with type one of
  search | recommend | review;
- ``user_history_part_*.json``: ``{user_id: [{product_info, review, split}, ...]}``, the
  users' purchases and their reviews;
- ``all_products_part_*.json``: ``{parent_asin: product_info}``, the catalogue;
- ``user_profiles.json`` (optional, not used by the single-turn task): ``{user_id:
  {"user_profile": {...}}}``, read by :func:`load_profiles`.

A task becomes one :class:`Sample`: ``input`` is the user turn ``USER {user_id}: {task}``
(review tasks add the target product's information), ``history`` the user's items whose
review is older than the task (each item's ``input`` the product as text, its ``output``
the review as text, the layout of the authors' ``pretty_history``), ``type`` the task
type, ``target`` the gold tool call as JSON (:func:`gold_call`) and ``meta`` the target
product's ``parent_asin`` and review text, which scoring reads.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from fints_repro.data.lamp import read_json
from fints_repro.data.schema import HistoryItem, Sample
from fints_repro.errors import DataError, MissingDataError

TASK_TYPES = ("search", "recommend", "review")
TOOL_OF_TYPE = {"search": "search_product_by_query",
                "recommend": "get_recommendations_by_history",
                "review": "add_product_review"}
ARGUMENT_OF_TOOL = {"search_product_by_query": ("query", str),
                    "get_recommendations_by_history": ("product_sequence", list),
                    "add_product_review": ("review", str)}
HINT = ("the PersonalWAB files (user_instructions.json, user_history_part_*.json, "
        "all_products_part_*.json) come from the benchmark's release (github.com/HongruCai/"
        "PersonalWAB, CC BY-NC 4.0); put them under data.root/<dataset.path>")


# ---- text renderings (the layout of the authors' pretty_history / pretty_product) -------
def _field(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value) if value is not None else ""


def product_text(info: Mapping[str, Any]) -> str:
    """A product as the memory, the search index and the review prompt show it."""
    return ("Product:\n"
            f"- Title: {_field(info.get('title'))}\n"
            f"- Parent Asin: {_field(info.get('parent_asin'))}\n"
            f"- Main Category: {_field(info.get('main_category'))}\n"
            f"- Average Rating: {_field(info.get('average_rating'))}\n"
            f"- Rating Number: {_field(info.get('rating_number'))}\n"
            f"- Price: {_field(info.get('price'))}\n"
            f"- Store: {_field(info.get('store'))}\n"
            f"- Details: {_field(info.get('details'))}\n"
            f"- Description: {_field(info.get('description'))}\n"
            f"- Features: {_field(info.get('features'))}")


def review_text(review: Mapping[str, Any]) -> str:
    return ("Review:\n"
            f"- Rating: {_field(review.get('rating'))}\n"
            f"- Text: {_field(review.get('text'))}\n"
            f"- Timestamp: {_field(review.get('timestamp'))}")


def call_json(name: str, arguments: Mapping[str, Any], wrapper: bool = True) -> str:
    """A tool call in the one serialisation pairs and targets use."""
    call = {"name": name, "arguments": dict(arguments)}
    return json.dumps({"tool_call": call} if wrapper else call, ensure_ascii=False)


def gold_call(task_type: str, target: Mapping[str, Any], memory: Iterable[HistoryItem],
              max_sequence: int = 30) -> str:
    """The call that solves a task (the chosen side of its contrastive pairs; ours: the
    benchmark has a target product, not a gold call): search = the target product's title
    as the query; recommend = the ASINs of the user's memory in time order (the last
    ``max_sequence``); review = the target review's text."""
    if task_type == "search":
        return call_json(TOOL_OF_TYPE["search"], {"query": target["product_info"]["title"]})
    if task_type == "recommend":
        items = sorted(memory, key=lambda h: h.timestamp or 0.0)
        seq = [h.meta["parent_asin"] for h in items][-max_sequence:]
        return call_json(TOOL_OF_TYPE["recommend"], {"product_sequence": seq})
    return call_json(TOOL_OF_TYPE["review"], {"review": target["review"]["text"]})


# ---- validation -------------------------------------------------------------------------
def _dict(obj: Any, *, file: str, record: str, what: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{what} is a {type(obj).__name__}, not a JSON object", file=file,
                        record=record)
    return obj


def _str(obj: dict, key: str, *, file: str, record: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise DataError(f"field '{where}.{key}' must be a non-empty string, got {v!r}",
                        file=file, record=record)
    return v


def _number(obj: dict, key: str, *, file: str, record: str, where: str) -> float:
    v = obj.get(key)
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise DataError(f"field '{where}.{key}' must be a number, got {v!r}", file=file,
                        record=record)
    return float(v)


def _product(obj: Any, *, file: str, record: str, where: str) -> dict:
    info = _dict(obj, file=file, record=record, what=f"'{where}'")
    _str(info, "parent_asin", file=file, record=record, where=where)
    _str(info, "title", file=file, record=record, where=where)
    return info


def _review(obj: Any, *, file: str, record: str, where: str) -> dict:
    review = _dict(obj, file=file, record=record, what=f"'{where}'")
    if not isinstance(review.get("text"), str):
        raise DataError(f"field '{where}.text' must be a string", file=file, record=record)
    _number(review, "timestamp", file=file, record=record, where=where)
    return review


@dataclass
class PwabFiles:
    tasks: dict[str, list[dict]]  # split -> validated tasks
    history: dict[str, list[dict]]  # user -> validated {product_info, review, split}
    products: dict[str, dict]  # parent_asin -> product_info
    files: dict[str, str]  # what was read, for messages


def _parts(root: Path, pattern: str) -> list[Path]:
    found = sorted(root.glob(pattern))
    if not found:
        raise MissingDataError(f"no file matching {root / pattern}; {HINT}", file=str(root / pattern))
    return found


def read_pwab(root: str | Path, instructions_file: str = "user_instructions.json",
              history_glob: str = "user_history_part_*.json",
              products_glob: str = "all_products_part_*.json") -> PwabFiles:
    """Read and validate the three kinds of file; every target must name a catalogue
    product and every task a user with a history file entry."""
    root = Path(root)
    path = root / instructions_file
    raw = read_json(path, hint=HINT)
    file = str(path)
    raw = _dict(raw, file=file, record="(top level)", what="the file")
    tasks: dict[str, list[dict]] = {}
    for split in ("train", "test"):
        records = raw.get(split, [])
        if not isinstance(records, list):
            raise DataError(f"'{split}' must be a list of tasks", file=file, record=split)
        out = []
        for i, t in enumerate(records):
            rec = f"{split}[{i}]"
            t = _dict(t, file=file, record=rec, what="the task")
            _str(t, "user_id", file=file, record=rec, where="task")
            _str(t, "task", file=file, record=rec, where="task")
            _number(t, "timestamp", file=file, record=rec, where="task")
            if t.get("type") not in TASK_TYPES:
                raise DataError(f"field 'type' must be one of {list(TASK_TYPES)}, got "
                                f"{t.get('type')!r}", file=file, record=rec)
            target = _dict(t.get("target"), file=file, record=rec, what="'target'")
            _product(target.get("product_info"), file=file, record=rec, where="target.product_info")
            if t["type"] == "review":
                _review(target.get("review"), file=file, record=rec, where="target.review")
            out.append(t)
        tasks[split] = out
    if not any(tasks.values()):
        raise DataError("no tasks: 'train' and 'test' are both empty or absent", file=file)

    history: dict[str, list[dict]] = {}
    for part in _parts(root, history_glob):
        data = _dict(read_json(part, hint=HINT), file=str(part), record="(top level)", what="the file")
        for uid, items in data.items():
            if not isinstance(items, list):
                raise DataError("a user's history must be a list", file=str(part), record=uid)
            for j, it in enumerate(items):
                rec = f"{uid}[{j}]"
                it = _dict(it, file=str(part), record=rec, what="the history item")
                _product(it.get("product_info"), file=str(part), record=rec, where="product_info")
                _review(it.get("review"), file=str(part), record=rec, where="review")
            history.setdefault(uid, []).extend(items)

    products: dict[str, dict] = {}
    for part in _parts(root, products_glob):
        data = _dict(read_json(part, hint=HINT), file=str(part), record="(top level)", what="the file")
        for asin, info in data.items():
            info = _product(info, file=str(part), record=asin, where="product")
            if info["parent_asin"] != asin:
                raise DataError(f"keyed by {asin!r} but its parent_asin is "
                                f"{info['parent_asin']!r}", file=str(part), record=asin)
            products[asin] = info
    for split, ts in tasks.items():
        for i, t in enumerate(ts):
            asin = t["target"]["product_info"]["parent_asin"]
            if asin not in products:
                raise DataError(f"the target product {asin!r} is not in the catalogue "
                                f"({products_glob})", file=file, record=f"{split}[{i}]")
            if t["user_id"] not in history:
                raise DataError(f"user {t['user_id']!r} has no entry in {history_glob}",
                                file=file, record=f"{split}[{i}]")
    return PwabFiles(tasks, history, products,
                     {"instructions": file, "history": history_glob, "products": products_glob})


def history_items(user: str, items: Iterable[dict]) -> list[HistoryItem]:
    """A user's history as items (oldest first): the product as ``input``, the review as
    ``output``; ``meta`` keeps the ASIN, the review text and the split."""
    out = []
    for it in items:
        info, review = it["product_info"], it["review"]
        ts = float(review["timestamp"])
        out.append(HistoryItem(
            id=f"{user}:{info['parent_asin']}:{int(ts)}", input=product_text(info),
            output=review_text(review), timestamp=ts,
            meta={"parent_asin": info["parent_asin"], "review": review.get("text", ""),
                  "split": it.get("split")}))
    return sorted(out, key=lambda h: h.timestamp)


def pwab_samples(data: PwabFiles, split: str, *, product_info_template: str,
                 min_train_tasks: int | None = None, max_sequence: int = 30,
                 user_turn_suffix: str = "") -> list[Sample]:
    """The split's tasks as samples (see the module docstring), in file order."""
    if split not in data.tasks:
        raise DataError(f"no split {split!r} (the file has {sorted(data.tasks)})",
                        file=data.files["instructions"])
    keep = None
    if min_train_tasks is not None:
        counts: dict[str, int] = {}
        for t in data.tasks.get("train", []):
            counts[t["user_id"]] = counts.get(t["user_id"], 0) + 1
        keep = {u for u, n in counts.items() if n >= min_train_tasks}
    items_of = {u: history_items(u, its) for u, its in data.history.items()}
    samples = []
    for i, t in enumerate(data.tasks[split]):
        user = t["user_id"]
        if keep is not None and user not in keep:
            continue
        ts = float(t["timestamp"])
        memory = tuple(h for h in items_of[user] if h.timestamp < ts)
        info = t["target"]["product_info"]
        text = f"USER {user}: {t['task']}"
        if t["type"] == "review":
            text += product_info_template.format(product=product_text(info))
        text += user_turn_suffix
        review = (t["target"].get("review") or {}).get("text", "")
        samples.append(Sample(
            id=f"{split}-{i}", user=user, input=text,
            target=gold_call(t["type"], t["target"], memory, max_sequence),
            history=memory, timestamp=ts, type=t["type"],
            meta={"task": t["task"], "target_asin": info["parent_asin"],
                  "target_review": review}))
    return samples


PROFILE_FIELDS = ("Gender", "Age", "Occupation", "Price Sensitivity", "Shopping Interest",
                  "Brand Preference", "Diversity Preference", "Interaction Complexity",
                  "Tone and Style", "Item Reference", "Focus Aspect")


def load_profiles(path: str | Path) -> dict[str, dict[str, str]]:
    """``user_profiles.json``: {user_id: {field: text}} with the benchmark's 11 fields."""
    file = str(path)
    data = _dict(read_json(Path(path), hint=HINT), file=file, record="(top level)", what="the file")
    out = {}
    for uid, rec in data.items():
        rec = _dict(rec, file=file, record=uid, what="the profile record")
        prof = _dict(rec.get("user_profile"), file=file, record=uid, what="'user_profile'")
        missing = [f for f in PROFILE_FIELDS if f not in prof]
        if missing:
            raise DataError(f"the profile lacks {missing}", file=file, record=uid)
        out[uid] = {k: str(v) for k, v in prof.items()}
    return out
