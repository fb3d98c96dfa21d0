"""On-disk caches keyed by content hash: every model-time stage (generations, contrastive
pairs, steering vectors) is stored under a key computed from what it was made from, so a
rerun or a sweep job reuses it and a killed run resumes where it stopped.

Every write is safe when several processes (a joblib or SLURM sweep) share the cache:

- a file that is written whole goes to a temporary file with a name of its own in the same
  folder, then is renamed over the target (``atomic_file``), so a reader sees the old file
  or the new one, never a mix, and two writers never share a temporary file;
- a JSONL store is appended to with one ``write`` per batch (``append_jsonl``), after a
  newline if a killed run left the last line cut; the parts of a sharded experiment
  (``shard.count > 1``) each append to a file of their own beside it and read them all
  (``GenerationStore``, ``writing_as``), so no two jobs write one file;
- files are created ``0644`` (``FILE_MODE``), whatever the umask or ``mkstemp`` would give,
  so a cache shared between users is readable by all of them;
- work that must run once (the model conversion) takes a file lock under
  ``<cache>/.locks/`` (``lock_for``);
- an ``OSError`` while writing (a full disk, no permission, a file where a folder should
  be) is a ``WriteError`` that names the file and what it holds (``write_error``,
  ``make_dir``); what was written before stays, so the rerun resumes from it.

Reading is lenient where a damaged entry can be recomputed: a JSONL line that is not UTF-8,
not JSON or not of the expected shape is dropped with one warning naming the file and the
line numbers (``read_jsonl_lenient``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from fints_repro.errors import CacheError, WriteError

if TYPE_CHECKING:
    from filelock import FileLock

log = logging.getLogger(__name__)

# Cache files are readable by everyone who can reach the cache folder.
FILE_MODE = 0o644


def content_hash(obj: Any, n: int = 16) -> str:
    """Stable short hash of JSON-able content (dict keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def write_error(path: Path, what: str, e: OSError) -> WriteError:
    """The error for an ``OSError`` while writing ``path`` (``what``: what it holds)."""
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        hint = "free space on that disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the folder writable, or point the run elsewhere"
    else:
        hint = "fix the cause"
    return WriteError(f"could not write {path} ({what}): {why}; {hint} and run again: what "
                      "was written before is kept and the run resumes from it", path=str(path))


def make_dir(path: Path, what: str) -> Path:
    """``path`` as a folder (created with its parents), or a WriteError that names it and
    says what it is for: a file in its place, no permission, a full disk."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise WriteError(f"{what} {path} is not a folder: {blocker} is a file; move the file "
                         "away or name another folder", path=str(path)) from e
    except OSError as e:
        raise write_error(path, what, e) from e
    return path


def remove_temporaries(path: Path) -> None:
    """The temporary folders and files a killed save of ``path`` left beside it
    (``.<name>.tmp*``). Call it only where no other process can be saving ``path`` (under
    its lock)."""
    for tmp in Path(path).parent.glob(f".{Path(path).name}.tmp*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path, what: str = "a cache entry") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the whole file to; on success it is
    flushed to disk, made ``FILE_MODE`` and renamed over ``path``, on an exception removed.

    The temporary name is unique to this call (``mkstemp``), so two processes writing the
    same target at once each rename a complete file of their own; the last rename wins.
    An ``OSError`` on the way (a full disk, no permission) is a ``WriteError`` naming
    ``path`` and ``what`` it holds; ``path`` then keeps what it held before.
    """
    path = Path(path)
    make_dir(path.parent, f"the folder of {what}")
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(path, what, e) from e
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates it 0600
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, what, e) from e
        raise


def write_text_atomic(path: Path, text: str, what: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8; a lone surrogate written as ``\\udXXX``),
    atomically (``atomic_file``)."""
    with atomic_file(path, what) as tmp:
        tmp.write_bytes(text.encode("utf-8", "backslashreplace"))


def write_json_atomic(path: Path, obj: Any, what: str) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically (``atomic_file``)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n", what)


def lock_for(target: Path) -> FileLock:
    """A file lock guarding the creation of ``target`` (``<cache>/<stage>/<name>``).

    The lock file lives in ``<cache>/.locks/<stage>/<name>.lock``, outside the stage's
    folder, so that listing a stage shows its entries only. The lock file stays after
    release (removing a lock file while others wait on it would break the exclusion).
    """
    from filelock import FileLock  # a dependency of transformers / huggingface_hub

    target = Path(target)
    lock = target.parent.parent / ".locks" / target.parent.name / f"{target.name}.lock"
    make_dir(lock.parent, "the cache's lock folder")
    return FileLock(str(lock))


def _line_numbers(numbers: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def read_jsonl_lenient(
    path: Path, required: Mapping[str, type | tuple[type, ...]] | None = None
) -> list[dict[str, Any]]:
    """The rows of a JSONL file that a killed run (or a damaged disk) may have cut short.

    A row must be a JSON object, and for each ``required`` key hold a value of that type.
    A line that is not UTF-8, not JSON, or not such an object is dropped (its sample is
    generated again), with one warning naming the file and the line numbers; never fatal.
    Blank lines are skipped silently. A file that cannot be read at all (not a file, no
    permission) is a CacheError naming it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CacheError(f"cannot read {path} ({e.strerror or e}); fix its permissions or delete it "
                         f"(rm -r {path}): what it held is computed again", path=str(path)) from e
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(number)
            continue
        if not isinstance(row, dict) or any(
            not isinstance(row.get(key), kind) for key, kind in (required or {}).items()
        ):
            bad.append(number)
            continue
        rows.append(row)
    if bad:
        log.warning("%s: dropped %d unreadable line(s) (line %s); their entries are computed again",
                    path, len(bad), _line_numbers(bad))
    return rows


def _encode_row(row: dict[str, Any]) -> bytes:
    """One JSONL line, UTF-8. A row holding a lone surrogate (which UTF-8 cannot encode) is
    written with JSON's ``\\u`` escapes instead, in ASCII: it reads back the same."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    try:
        return line.encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


def _encode_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(map(_encode_row, rows))


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]], what: str = "cached rows") -> None:
    """Append rows and flush them to disk (a kill loses at most the line being written).

    The rows go out in one ``write`` on a file opened for appending, so two processes
    appending to one store do not interleave inside a line. When the file does not end
    with a newline (a killed run cut its last line), a newline is written first: the cut
    line stays a line of its own (dropped when read) instead of swallowing the first row.
    A new file is created ``FILE_MODE``. An ``OSError`` (a full disk, no permission) is a
    ``WriteError`` naming the file and ``what`` it holds; the rows appended before stay.
    """
    payload = _encode_rows(rows)
    if not payload:
        return
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away
        except FileExistsError:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                payload = b"\n" + payload
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(Path(path), what, e) from e


def write_jsonl_atomic(path: Path, rows: Sequence[dict[str, Any]], what: str = "rows") -> None:
    """Replace the file with these rows: written to a temporary file of this call's own
    beside it, then renamed (``atomic_file``)."""
    with atomic_file(Path(path), what) as tmp:
        tmp.write_bytes(_encode_rows(rows))


_WRITER = {"tag": ""}  # this process's part of a sharded experiment ("" : the whole)


@contextlib.contextmanager
def writing_as(tag: str) -> Iterator[None]:
    """Within the block, stores append to files of their own tagged ``tag`` (one per
    part of a sharded experiment, e.g. ``part-1-of-3``)."""
    before = _WRITER["tag"]
    _WRITER["tag"] = tag
    try:
        yield
    finally:
        _WRITER["tag"] = before


class GenerationStore:
    """Append-only JSONL of generations keyed by prompt hash, one file per
    (model, decoding, batching, steering) fingerprint: ``<key>.jsonl``, and beside it
    ``<key>.<tag>.jsonl`` written by the parts of a sharded experiment (``writing_as``);
    a store reads them all and appends to its own.

    A line is ``{"key": str, "generation": str}``; a damaged line is dropped with a warning
    when the store is opened, and its generation is made again.
    """

    ROW = {"key": str, "generation": str}

    def __init__(self, path: Path):
        tag = _WRITER["tag"]
        self.path = path.with_name(f"{path.stem}.{tag}{path.suffix}") if tag else path
        self.items: dict[str, str] = {}
        for part in [path, *sorted(path.parent.glob(f"{path.stem}.*{path.suffix}"))]:
            self.items.update((r["key"], r["generation"])
                              for r in read_jsonl_lenient(part, required=self.ROW))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    def add(self, pairs: Sequence[tuple[str, str]]) -> None:
        make_dir(self.path.parent, "the generation cache")
        append_jsonl(self.path, [{"key": k, "generation": g} for k, g in pairs], "cached generations")
        self.items.update(pairs)
