"""Name → implementation registries that fail loudly on a duplicate or unknown name.

The one way every pluggable component is registered: tasks, backbones, steering methods,
metrics, post-processing rules, retrievers, data loaders and trackers each have one
``Registry``; a second registration under a taken name is an error, and an unknown name
is a ``ConfigError`` that lists the known ones.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from fints_repro.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered: registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        """The entry ``name``; ``key`` (e.g. ``logger.name``) is the config key the name
        came from, named in the error."""
        if name not in self._items:
            where = f"unknown {key}={name!r}" if key else f"unknown {self.kind} {name!r}"
            raise ConfigError(f"{where} ({self.kind}); known: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def copy(self) -> "Registry[T]":
        """A registry with the same entries (e.g. to register test-only components)."""
        new: Registry[T] = Registry(self.kind)
        new._items = dict(self._items)
        return new

    def __contains__(self, name: object) -> bool:
        return name in self._items
