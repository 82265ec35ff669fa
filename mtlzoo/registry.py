"""The strategy registry: a pluggy ``PluginManager`` named ``mtlzoo``.

Built-in strategies come from the internal plugin :mod:`mtlzoo.strategies`; third-party ones from
the ``mtlzoo`` entry-point group, loaded on the first lookup or listing (never on ``import
mtlzoo``), one entry point at a time so that a broken plugin is reported and the rest still load.
Set ``MTLZOO_DISABLE_PLUGIN_AUTOLOAD`` to a non-empty value to skip entry points.

Names are case-insensitive and ``-`` equals ``_``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from mtlzoo import hookspecs
from mtlzoo.errors import DuplicateStrategyError, InvalidStrategyError, PluginWarning, UnknownStrategyError
from mtlzoo.strategy import REQUIRED, Kind, Needs, Strategy, StrategyInfo, hyperparameters

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DISABLE_AUTOLOAD_ENV = "MTLZOO_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PLUGIN = "mtlzoo.strategies"


@dataclass(frozen=True)
class Origin:
    """Where a registered strategy came from.

    Attributes:
        plugin: The plugin's name in the plugin manager.
        distribution: The installed distribution that provides it (``None`` for built-ins and
            in-process registrations).
        version: That distribution's version.
        builtin: Whether it ships with mtlzoo.
    """

    plugin: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False

    def __str__(self) -> str:
        if self.builtin:
            return "built-in"
        if self.distribution:
            return f"{self.distribution} {self.version}"
        return f"in-process ({self.plugin})"


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its class, its metadata and where it came from."""

    cls: type[Strategy]
    origin: Origin

    @property
    def info(self) -> StrategyInfo:
        return self.cls.info

    @property
    def name(self) -> str:
        return self.cls.info.name

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return hyperparameters(self.cls)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready description (``mtlzoo list --format json``)."""
        info = self.info
        paper = info.paper
        return {
            "name": info.name,
            "aliases": list(info.aliases),
            "kind": info.kind,
            "needs": info.needs,
            "summary": info.summary,
            "paper": None if paper is None else {
                "authors": list(paper.authors), "title": paper.title, "venue": paper.venue,
                "year": paper.year, "url": paper.url, "citation": paper.citation(),
            },
            "hyperparameters": {
                name: None if default is REQUIRED else _jsonable(default)
                for name, default in self.hyperparameters.items()
            },
            "required": [name for name, default in self.hyperparameters.items() if default is REQUIRED],
            "properties": sorted(info.properties),
            "stochastic": info.stochastic,
            "learnable": info.learnable,
            "adapts_representation": info.adapts_representation,
            "origin": str(self.origin),
            "distribution": self.origin.distribution,
            "version": self.origin.version,
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return repr(value)


def normalize_name(name: str) -> str:
    """The lookup key of a name: lower case, ``-`` replaced by ``_``."""
    return name.strip().lower().replace("-", "_")


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


class StrategyRegistry:
    """Strategies by name, fed by pluggy plugins. The module-level functions use one instance."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entries: dict[str, StrategyEntry] = {}
        self._keys: dict[str, str] = {}
        self._origins: dict[str, Origin] = {}
        self._builtins_loaded = False
        self._entry_points_loaded = False
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- loading
    def _load_builtins(self) -> None:
        with self._lock:
            if self._builtins_loaded:
                return
            self._builtins_loaded = True
            import mtlzoo.strategies as builtin

            self._add_plugin(builtin, BUILTIN_PLUGIN, Origin(BUILTIN_PLUGIN, builtin=True), strict=True)

    def load(self) -> None:
        """Load the built-ins and, unless disabled, every ``mtlzoo`` entry point (idempotent)."""
        with self._lock:
            self._load_builtins()
            if self._entry_points_loaded:
                return
            self._entry_points_loaded = True
            if os.environ.get(DISABLE_AUTOLOAD_ENV):
                return
            for entry_point in _entry_points():
                self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        dist = getattr(entry_point, "dist", None)
        distribution = dist.name if dist is not None else None
        version = dist.version if dist is not None else None
        where = f"entry point {entry_point.name!r} ({entry_point.value})" + (
            f" of distribution {distribution!r} {version}" if distribution else ""
        )
        if self._pm.has_plugin(entry_point.name):
            warnings.warn(f"mtlzoo skipped plugin {where}: a plugin named {entry_point.name!r} is already loaded "
                          f"(from {self._origins.get(entry_point.name, 'this process')}).", PluginWarning, stacklevel=3)
            return
        try:
            plugin = entry_point.load()
        except Exception as error:  # a broken plugin must not take the others down
            warnings.warn(f"mtlzoo could not import plugin {where}: {type(error).__name__}: {error}", PluginWarning,
                          stacklevel=3)
            return
        origin = Origin(entry_point.name, distribution, version)
        try:
            self._add_plugin(plugin, entry_point.name, origin, strict=False)
        except Exception as error:
            warnings.warn(f"mtlzoo could not load plugin {where}: {type(error).__name__}: {error}", PluginWarning,
                          stacklevel=3)

    def _add_plugin(self, plugin: object, name: str, origin: Origin, *, strict: bool) -> None:
        """Register ``plugin`` with pluggy and collect its strategies, undoing it all on failure."""
        self._pm.register(plugin, name=name)
        try:
            self._pm.check_pending()
            self._collect(plugin, origin, strict=strict)
        except Exception:
            self._drop_plugin(name)
            raise
        self._origins[name] = origin

    def _collect(self, plugin: object, origin: Origin, *, strict: bool) -> None:
        def register(cls: type) -> None:
            try:
                self._add_strategy(cls, origin)
            except DuplicateStrategyError as error:
                if strict:
                    raise
                warnings.warn(f"{error} The strategy was not registered.", PluginWarning, stacklevel=2)

        arguments: dict[str, Callable[[type], None]] = {"register": register}
        for impl in self._pm.hook.mtlzoo_register_strategies.get_hookimpls():
            if impl.plugin is plugin:
                impl.function(**{name: arguments[name] for name in impl.argnames})

    def _add_strategy(self, cls: type, origin: Origin) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise InvalidStrategyError(
                f"register() takes a subclass of mtlzoo.Strategy; plugin {origin} passed {cls!r}."
            )
        info = getattr(cls, "info", None)
        if not isinstance(info, StrategyInfo):
            raise InvalidStrategyError(
                f"Strategy class {cls.__qualname__} (from {origin}) has no `info = StrategyInfo(...)` class attribute."
            )
        keys = [normalize_name(info.name), *(normalize_name(alias) for alias in info.aliases)]
        for key in keys:
            if key in self._keys:
                other = self._entries[self._keys[key]]
                raise DuplicateStrategyError(
                    f"Strategy name {key!r} of {cls.__qualname__} (from {origin}) is already taken by "
                    f"{other.cls.__qualname__} (from {other.origin})."
                )
        if len(set(keys)) != len(keys):
            raise InvalidStrategyError(f"Strategy {info.name!r} (from {origin}) lists the same name twice: {keys}.")
        canonical = keys[0]
        self._entries[canonical] = StrategyEntry(cls, origin)
        for key in keys:
            self._keys[key] = canonical

    def _drop_plugin(self, name: str) -> None:
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        self._origins.pop(name, None)
        for canonical in [c for c, entry in self._entries.items() if entry.origin.plugin == name]:
            del self._entries[canonical]
        self._keys = {key: c for key, c in self._keys.items() if c in self._entries}

    # ------------------------------------------------------------ registration
    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object in this process; its strategies are available at once.

        Raises:
            DuplicateStrategyError: A strategy of the plugin takes a name already registered
                (nothing of the plugin is kept).
        """
        with self._lock:
            self._load_builtins()
            name = name or self._pm.get_canonical_name(plugin)
            if self._pm.has_plugin(name):
                raise DuplicateStrategyError(f"A plugin named {name!r} is already registered; remove it first with "
                                             f"mtlzoo.registry.REGISTRY.unregister_plugin({name!r}).")
            self._add_plugin(plugin, name, Origin(name), strict=True)
            return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and every strategy it registered."""
        with self._lock:
            if name == BUILTIN_PLUGIN:
                raise ValueError("The built-in strategies cannot be unregistered.")
            if not self._pm.has_plugin(name):
                raise KeyError(f"No plugin named {name!r} is registered.")
            self._drop_plugin(name)

    def plugins(self) -> dict[str, Origin]:
        """The loaded plugins and their origins, by plugin name."""
        self.load()
        return dict(self._origins)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> StrategyEntry:
        """The registered strategy called ``name`` (or one of its aliases).

        Raises:
            UnknownStrategyError: No strategy has that name; the message lists close matches.
        """
        self.load()
        if not isinstance(name, str):
            raise TypeError(f"A strategy name is a str. Found {name!r}.")
        canonical = self._keys.get(normalize_name(name))
        if canonical is None:
            close = difflib.get_close_matches(normalize_name(name), list(self._keys), n=5, cutoff=0.6)
            suggestions = sorted({self._keys[key] for key in close}, key=_natural_key)
            hint = f" Did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
            raise UnknownStrategyError(
                f"Unknown strategy {name!r}.{hint} `mtlzoo list` shows every registered strategy."
            )
        return self._entries[canonical]

    def create(self, name: str, **kwargs: Any) -> Strategy:
        """Instantiate the strategy called ``name`` with ``kwargs``."""
        return self.get(name).cls(**kwargs)

    def list(
        self,
        pattern: str | Iterable[str] = "*",
        *,
        kind: Kind | None = None,
        needs: Needs | None = None,
        exclude: str | Iterable[str] = (),
    ) -> list[StrategyEntry]:
        """Registered strategies whose name or an alias matches ``pattern`` (fnmatch), sorted naturally."""
        self.load()
        include = [pattern] if isinstance(pattern, str) else list(pattern)
        excluded = [exclude] if isinstance(exclude, str) else list(exclude)

        def names(entry: StrategyEntry) -> list[str]:
            return [entry.name, *entry.info.aliases]

        def matches(entry: StrategyEntry, patterns: list[str]) -> bool:
            return any(fnmatch.fnmatch(normalize_name(n), normalize_name(p)) for n in names(entry) for p in patterns)

        chosen = [
            entry for entry in self._entries.values()
            if matches(entry, include) and not matches(entry, excluded)
            and (kind is None or entry.info.kind == kind) and (needs is None or entry.info.needs == needs)
        ]
        return sorted(chosen, key=lambda entry: _natural_key(entry.name))


REGISTRY = StrategyRegistry()
"""The process-wide registry behind :func:`create`, :func:`list_strategies` and friends."""


def create(name: str, **kwargs: Any) -> Strategy:
    """Create a registered strategy by name.

    Example:
        >>> import mtlzoo
        >>> mtlzoo.create("ls", num_tasks=2, weights=[1.0, 2.0])
        LinearScalarization(num_tasks=2, weights=[1.0, 2.0])
    """
    return REGISTRY.create(name, **kwargs)


def get_strategy(name: str) -> StrategyEntry:
    """The registry entry (class, metadata, origin) of a strategy name or alias."""
    return REGISTRY.get(name)


def list_strategies(
    pattern: str | Iterable[str] = "*",
    *,
    kind: Kind | None = None,
    needs: Needs | None = None,
    exclude: str | Iterable[str] = (),
) -> list[StrategyEntry]:
    """List registered strategies, filtered by fnmatch name patterns and metadata.

    Example:
        >>> import mtlzoo
        >>> [entry.name for entry in mtlzoo.list_strategies("roto*")]
        ['rotograd', 'rotograd_norm']
    """
    return REGISTRY.list(pattern, kind=kind, needs=needs, exclude=exclude)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator registering a strategy in this process, through a small plugin object.

    The plugin is named after the class (``"module:QualName"``); remove it with
    ``REGISTRY.unregister_plugin(name)``.

    Raises:
        DuplicateStrategyError: The name or an alias is already registered.
    """

    class _InProcessPlugin:
        @staticmethod
        @hookspecs.hookimpl
        def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
            register(cls)

    REGISTRY.register_plugin(_InProcessPlugin(), name=f"{cls.__module__}:{cls.__qualname__}")
    return cls
