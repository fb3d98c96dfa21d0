"""Name → implementation registries: one per kind of plug-in (steering methods, backbones,
tasks, retrievers, metrics, post-processing rules, data loaders, trackers).

A plug-in is one module that registers itself (``@REGISTRY.register("name")``), optionally
with its own typed settings (``settings=``, a dataclass: the config node
``<group>.<name>.*``). A registry given its ``package`` imports every module of that
package the first time it is asked for a name, so a new plug-in is found by being there:
no list of imports to keep. A second registration under a taken name is an error naming
both places; an unknown name is a ``ConfigError`` that names the config key, suggests the
near names and lists the known ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, Optional, TypeVar

from fints_repro.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: Optional[str] = None):
        self.kind = kind
        self.package = package  # whose modules register into this registry
        self._items: dict[str, T] = {}
        self._settings: dict[str, type] = {}
        self._where: dict[str, str] = {}
        self._discovered = package is None
        self._schema: Optional[type] = None

    def register(self, name: str, *, settings: Optional[type] = None) -> Callable[[T], T]:
        """Register the decorated object as ``name``; ``settings``: its typed settings."""

        def deco(obj: T) -> T:
            where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice: by "
                                 f"{self._where[name]} and by {where}")
            self._items[name] = obj
            self._where[name] = where
            if settings is not None:
                self._settings[name] = settings
            return obj

        return deco

    def discover(self) -> None:
        """Import every module of ``package`` (once) so that each registers itself."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{self.package}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                importlib.import_module(info.name)

    def get(self, name: str, key: str | None = None) -> T:
        """The entry ``name``; ``key`` (e.g. ``logger.name``) is the config key the name
        came from, named in the error."""
        self.discover()
        if name not in self._items:
            where = f"unknown {key}={name!r} ({self.kind})" if key else f"unknown {self.kind} {name!r}"
            near = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.6)
            hint = f" did you mean {' or '.join(map(repr, near))}?" if near else ""
            raise ConfigError(f"{where};{hint} known: {sorted(self._items)}")
        return self._items[name]

    def settings(self) -> dict[str, type]:
        """{name: settings dataclass} of the entries that have their own settings."""
        self.discover()
        return dict(sorted(self._settings.items()))

    def schema(self, base: type, module: str) -> type:
        """``base`` (a config dataclass) with one node per entry that has settings
        (``<name>: <its settings>``): the type Hydra composes the entries' config group
        into. Made once, after the package's modules are found; ``module`` is where the
        type is found by its name (a module ``__getattr__``: pickling, multirun workers)."""
        if self._schema is None:
            nodes = self.settings()
            self._schema = dataclasses.make_dataclass(
                base.__name__.removesuffix("Config") + "Schema",
                [(n, t, dataclasses.field(default_factory=t)) for n, t in nodes.items()],
                bases=(base,))
            self._schema.__module__ = module
        return self._schema

    def origin(self, name: str) -> str:
        """Where ``name`` was registered (``module.qualname``)."""
        self.get(name)
        return self._where[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def copy(self) -> "Registry[T]":
        """A registry with the same entries (e.g. to register test-only components)."""
        self.discover()
        new: Registry[T] = Registry(self.kind)
        new._items, new._settings, new._where = dict(self._items), dict(self._settings), dict(self._where)
        return new

    def __contains__(self, name: Any) -> bool:
        self.discover()
        return name in self._items


def settings_of(cfg: Any, name: str, group: str) -> Any:
    """Entry ``name``'s own settings in the ``group`` config ``cfg`` (``<group>.<name>``)."""
    node = getattr(cfg, name, None)
    if node is None:
        raise ConfigError(f"{group}.{name}: this {group} config has no node for {name!r}: "
                          f"compose it (compose_run) or make it from the {group} schema")
    return node
