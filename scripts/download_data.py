"""Download a benchmark's official files (needs internet).

    python scripts/download_data.py lamp4 [--root data] [--split dev]
    python scripts/download_data.py lamp5 --split train
    python scripts/download_data.py longlamp_abstract --split dev [--temporal]

LaMP-4/5 (user-based split, "new" release) come from the LaMP site into
``<root>/lamp4/`` or ``<root>/lamp5/`` as ``{split}_questions.json`` and, except for
``test`` (its labels are not public), ``{split}_outputs.json``. (Files fetched by hand in
the server's own layout, ``<root>/LaMP_4/{split}/{split}_questions.json``, are read as
well, with no other setting.) LongLaMP abstract
generation comes from the Hugging Face Hub (``LongLaMP/LongLaMP``) into
``<root>/longlamp_abstract/{split}.jsonl`` (``longlamp_abstract_temporal/`` with
``--temporal``); its ``dev`` is the Hub's ``val`` split.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

LAMP_BASE = "https://ciir.cs.umass.edu/downloads/LaMP"
LAMP_DIRS = {"lamp4": "LaMP_4", "lamp5": "LaMP_5"}
LONGLAMP_HUB = "LongLaMP/LongLaMP"
LONGLAMP_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}
TASKS = (*LAMP_DIRS, "longlamp_abstract")


def lamp_plan(task: str, root: Path, split: str) -> list[tuple[str, Path]]:
    """The (url, destination) of each official LaMP file of ``split``."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"LaMP splits are train, dev and test, not {split!r}")
    kinds = ["questions"] if split == "test" else ["questions", "outputs"]
    return [
        (f"{LAMP_BASE}/{LAMP_DIRS[task]}/new/{split}/{split}_{kind}.json", Path(root) / task / f"{split}_{kind}.json")
        for kind in kinds
    ]


def longlamp_plan(root: Path, split: str, temporal: bool = False) -> tuple[str, str, Path]:
    """The Hub config, the Hub split and the destination file for a LongLaMP split."""
    if split not in LONGLAMP_SPLITS:
        raise ValueError(f"LongLaMP splits are {sorted(LONGLAMP_SPLITS)}, not {split!r}")
    config = "abstract_generation_temporal" if temporal else "abstract_generation_user"
    folder = "longlamp_abstract_temporal" if temporal else "longlamp_abstract"
    return config, LONGLAMP_SPLITS[split], Path(root) / folder / f"{split}.jsonl"


def _part_file(dest: Path) -> Path:
    """A temporary file of this process's own beside ``dest`` (two downloads of the same
    file never write into one another's)."""
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    return Path(name)


def _finish(tmp: Path, dest: Path) -> None:
    """Readable by everyone (mkstemp makes it private), then renamed into place."""
    os.chmod(tmp, 0o644)
    tmp.replace(dest)


def download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` (written whole or not at all; an empty answer is an error,
    so an empty data file is never left behind)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_file(dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(
            f"could not download {url}: {e}\n"
            f"This needs internet; on a machine without it, fetch the file elsewhere and put it at {dest}."
        ) from e
    if tmp.stat().st_size == 0:
        tmp.unlink()
        raise SystemExit(f"{url} answered with an empty file; nothing was written to {dest}. Try again later.")
    _finish(tmp, dest)


def write_longlamp(config: str, hub_split: str, dest: Path) -> int:
    """Write one LongLaMP split from the Hub as JSON lines; returns the row count."""
    from datasets import load_dataset

    try:
        rows = load_dataset(LONGLAMP_HUB, config, split=hub_split)
    except Exception as e:  # datasets wraps network failures in several types
        raise SystemExit(
            f"could not load {LONGLAMP_HUB} ({config}, split {hub_split}): {e}\n"
            f"This needs access to the Hugging Face Hub; elsewhere, write the split to {dest} as JSON lines."
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_file(dest)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _finish(tmp, dest)
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--root", type=Path, default=Path("data"))
    parser.add_argument("--split", default="dev")
    parser.add_argument("--temporal", action="store_true", help="LongLaMP: the time-based split")
    args = parser.parse_args(argv)
    if args.temporal and args.task != "longlamp_abstract":
        parser.error("--temporal is for longlamp_abstract only")
    try:
        if args.task == "longlamp_abstract":
            config, hub_split, dest = longlamp_plan(args.root, args.split, args.temporal)
            n = write_longlamp(config, hub_split, dest)
            print(f"wrote {n} rows to {dest}")
        else:
            for url, dest in lamp_plan(args.task, args.root, args.split):
                download(url, dest)
                print(f"{url} -> {dest}")
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
