"""Errors a user can act on: each names what was wrong and where."""

from __future__ import annotations


class FintsError(Exception):
    """Base class for the framework's user-facing errors."""


class DataError(FintsError):
    """Bad or missing input data. The message names the file and, where known, the record."""

    def __init__(self, message: str, *, file: str | None = None, record: str | int | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if record is not None:
            where.append(f"record {record}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(prefix + message)
        self.file = file
        self.record = record


class MissingDataError(DataError):
    """Dataset files are not where the config says; the message says how to get them."""


class ConfigError(FintsError):
    """A configuration that cannot work, caught at start-up."""


class CacheError(FintsError):
    """A cache file or folder that is damaged beyond automatic repair, or that this process
    may not read or write. The message names it and says what to delete (a deleted cache
    entry is recomputed by the next run)."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path


class WriteError(FintsError):
    """A file or folder that could not be written (disk full, no permission, a file where a
    folder should be). The message names it and what was being saved; whatever was
    written before stays valid, so the run resumes from it once the cause is fixed."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


def hub_unavailable(repo: str, what: str, instead: str, cause: Exception) -> ConfigError:
    """The error for a hub id that neither the local Hugging Face cache nor the hub gave
    (offline, gated, misspelt): names ``what`` wanted it and what to do ``instead``."""
    why = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ConfigError(f"{what}: {repo!r} could not be loaded from the Hugging Face hub or its "
                       f"local cache ({why}). Download it once where the hub is reachable "
                       f"(huggingface-cli download {repo}), or {instead}")
