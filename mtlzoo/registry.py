"""The strategy registry: a pluggy ``PluginManager`` named ``mtlzoo``.

Built-in strategies come from the internal plugin :mod:`mtlzoo.strategies`; third-party ones from
the ``mtlzoo`` entry-point group, loaded on the first lookup or listing (never on ``import
mtlzoo``), one entry point at a time so that a broken plugin is reported and the rest still load.
Set ``MTLZOO_DISABLE_PLUGIN_AUTOLOAD`` to a non-empty value to skip entry points.

Names are case-insensitive and ``-`` equals ``_``. In-process registrations
(:func:`register_strategy`, :meth:`StrategyRegistry.register_plugin`) load the entry points first,
so a name clash with an installed plugin is refused the same way whatever the order.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from mtlzoo import hookspecs
from mtlzoo.errors import (
    DuplicateStrategyError,
    InvalidPluginError,
    InvalidStrategyError,
    MissingHyperparameterError,
    PluginWarning,
    UnknownHyperparameterError,
    UnknownStrategyError,
)
from mtlzoo.strategy import REQUIRED, Kind, Strategy, StrategyInfo, hyperparameters

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DISABLE_AUTOLOAD_ENV = "MTLZOO_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PLUGIN = "mtlzoo.strategies"


@dataclass(frozen=True)
class Origin:
    """Where a registered strategy came from.

    Attributes:
        plugin: The plugin's name in the plugin manager.
        distribution: The installed distribution that provides it (``None`` for built-ins and
            in-process registrations; a registration made while an entry point is imported gets
            that entry point's distribution).
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
            "request": {"where": info.request.where, "statistic": info.request.statistic,
                        "parameters": None if info.request.parameters is None else list(info.request.parameters),
                        "batches": info.request.batches},
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


def normalize_pattern(pattern: str) -> str:
    """An fnmatch pattern made to match normalised names: lower case, ``-`` replaced by ``_``.

    Only ``-`` outside ``[...]`` character classes is replaced, so ``"[a-m]*"`` keeps its range.
    Classes are delimited as :func:`fnmatch.translate` does (``[!...]``, a leading ``]`` is literal, an
    unclosed ``[`` is a literal character).
    """
    text = pattern.strip().lower()
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "[":
            j = i + 1
            j += j < len(text) and text[j] == "!"
            j += j < len(text) and text[j] == "]"
            end = text.find("]", j)
            if end >= 0:
                out.append(text[i:end + 1])
                i = end + 1
                continue
        out.append("_" if text[i] == "-" else text[i])
        i += 1
    return "".join(out)


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


class _DecoratedStrategy:
    """The plugin object behind :func:`register_strategy`: it hands one class to the registry."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    @hookspecs.hookimpl
    def mtlzoo_register_strategies(self, register: Callable[[type], None]) -> None:
        register(self.cls)


def _same_definition(a: type, b: type) -> bool:
    """Whether ``b`` is ``a`` or a re-definition of it (a re-run notebook cell, a reloaded module).

    A re-definition comes from the same module under the same qualified name and keeps the strategy
    name; classes of one factory share a qualified name but not a strategy name.
    """
    def identity(cls: type) -> tuple[str, str, str]:
        return cls.__module__, cls.__qualname__, normalize_name(cls.info.name)

    return a is b or identity(a) == identity(b)


def _check_hyperparameters(name: str, cls: type, kwargs: dict[str, Any], others: Iterable[StrategyEntry]) -> None:
    """Refuse keyword arguments that ``cls`` does not take, and required ones that are missing.

    Raises:
        UnknownHyperparameterError: An argument the constructor does not take (unless it has ``**kwargs``).
        MissingHyperparameterError: A required constructor argument that is not given.
    """
    parameters = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in parameters if p.kind in by_name]
    accepted = [p.name for p in named]
    listing = ", ".join(p if d is REQUIRED else f"{p}={d!r}" for p, d in hyperparameters(cls).items()) or "none"
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unknown = [] if takes_any else [key for key in kwargs if key not in accepted]
    if unknown:
        sentences = []
        for key in unknown:
            sentence = f"Strategy {name!r} has no hyperparameter {key!r}."
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            if close:
                sentence += f" Did you mean {close[0]!r}?"
            owners = sorted(entry.name for entry in others if key in entry.hyperparameters)
            if owners:
                sentence += f" ({key!r} is a hyperparameter of {', '.join(map(repr, owners))}.)"
            sentences.append(sentence)
        raise UnknownHyperparameterError(" ".join(sentences) + f" Its hyperparameters: {listing}.")
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise MissingHyperparameterError(
            f"Strategy {name!r} needs the hyperparameter{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))}, which has no default: pass "
            f"{', '.join(f'{p}=...' for p in missing)}. Its hyperparameters: {listing}."
        )


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
        self._loading: Origin | None = None  # the entry point being imported, if any
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
        origin = Origin(entry_point.name, distribution, version)
        before = set(self._origins)
        try:
            self._loading = origin  # what register_strategy runs at import is attributed to this entry point
            try:
                plugin = entry_point.load()
            finally:
                self._loading = None
        except Exception as error:  # a broken plugin must not take the others down
            self._drop_plugins(set(self._origins) - before)
            warnings.warn(f"mtlzoo could not import plugin {where}: {type(error).__name__}: {error}", PluginWarning,
                          stacklevel=3)
            return
        try:
            self._add_plugin(plugin, entry_point.name, origin, strict=False)
        except Exception as error:
            self._drop_plugins(set(self._origins) - before)
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

        impls = [impl for impl in self._pm.hook.mtlzoo_register_strategies.get_hookimpls() if impl.plugin is plugin]
        for impl in impls:
            if impl.wrapper or impl.hookwrapper:
                raise InvalidPluginError(
                    f"Plugin {impl.plugin_name!r} implements mtlzoo_register_strategies as a hook wrapper; mtlzoo "
                    f"does not support wrappers: drop wrapper=True/hookwrapper=True from its @mtlzoo.hookimpl and "
                    f"call register(cls) directly."
                )
        arguments: dict[str, Callable[[type], None]] = {"register": register}
        for impl in impls:
            impl.function(**{name: arguments[name] for name in impl.argnames})

    @staticmethod
    def _keys_of(cls: type, origin: Origin) -> list[str]:
        """The normalised name and aliases of a strategy class, after checking that it is one."""
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise InvalidStrategyError(
                f"register() takes a subclass of mtlzoo.Strategy; plugin {origin} passed {cls!r}."
            )
        info = getattr(cls, "info", None)
        if not isinstance(info, StrategyInfo):
            raise InvalidStrategyError(
                f"Strategy class {cls.__qualname__} (from {origin}) has no `info = StrategyInfo(...)` class attribute."
            )
        if isinstance(info.aliases, str):
            raise InvalidStrategyError(
                f"Strategy class {cls.__qualname__} (from {origin}) gives `aliases` as a str, which would make "
                f"each character an alias. Write a tuple of names: `aliases=({info.aliases!r},)`."
            )
        names = [info.name, *info.aliases]
        if not all(isinstance(name, str) and name.strip() for name in names):
            raise InvalidStrategyError(
                f"Strategy class {cls.__qualname__} (from {origin}) should have a non-empty str `name` and a tuple "
                f"of non-empty str `aliases`. Found `name = {info.name!r}`, `aliases = {info.aliases!r}`."
            )
        keys = [normalize_name(name) for name in names]
        if len(set(keys)) != len(keys):
            raise InvalidStrategyError(f"Strategy {info.name!r} (from {origin}) lists the same name twice: {keys}.")
        return keys

    def _add_strategy(self, cls: type, origin: Origin) -> None:
        keys = self._keys_of(cls, origin)
        for key in keys:
            if key in self._keys:
                other = self._entries[self._keys[key]]
                raise DuplicateStrategyError(
                    f"Strategy name {key!r} of {cls.__qualname__} (from {origin}) is already taken by "
                    f"{other.cls.__qualname__} (from {other.origin})."
                )
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

    def _drop_plugins(self, names: Iterable[str]) -> None:
        for name in names:
            self._drop_plugin(name)

    # ------------------------------------------------------------ registration
    def _in_process_origin(self, name: str) -> Origin:
        """The origin of a plugin registered now: in-process, or the entry point being imported."""
        loading = self._loading
        return Origin(name) if loading is None else Origin(name, loading.distribution, loading.version)

    def _check_plugin_name(self, name: str) -> None:
        if self._pm.has_plugin(name):
            raise DuplicateStrategyError(f"A plugin named {name!r} is already registered; remove it first with "
                                         f"mtlzoo.registry.REGISTRY.unregister_plugin({name!r}).")

    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object in this process; its strategies are available at once.

        The entry points are loaded first, so a strategy name an installed plugin already has is
        refused whether or not anything was looked up before.

        Raises:
            DuplicateStrategyError: A strategy of the plugin takes a name already registered
                (nothing of the plugin is kept).
            InvalidPluginError: The plugin's hook is a wrapper.
        """
        with self._lock:
            self.load()
            name = name or self._pm.get_canonical_name(plugin)
            self._check_plugin_name(name)
            self._add_plugin(plugin, name, self._in_process_origin(name), strict=True)
            return name

    def register_class(self, cls: type[Strategy]) -> str:
        """Register one strategy class in this process (what :func:`register_strategy` does).

        Registering the same class again changes nothing; a re-definition of a class registered
        this way (same module, qualified name and strategy name: a re-run notebook cell, a reloaded
        module) replaces it and keeps its origin. The plugin is named ``"module:QualName[name]"``.

        Returns:
            The name of the plugin that holds the class.

        Raises:
            DuplicateStrategyError: Another class has the name or an alias (nothing changes).
            InvalidStrategyError: ``cls`` is not a usable strategy class.
        """
        with self._lock:
            self.load()
            info = getattr(cls, "info", None)
            name = f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', repr(cls))}"
            name += f"[{info.name}]" if isinstance(info, StrategyInfo) else ""
            keys = self._keys_of(cls, self._in_process_origin(name))
            taken = {self._entries[self._keys[key]] for key in keys if key in self._keys}
            if taken and all(entry.cls is cls for entry in taken):
                return next(iter(taken)).origin.plugin
            replaced = sorted({
                entry.origin.plugin for entry in taken
                if isinstance(plugin := self._pm.get_plugin(entry.origin.plugin), _DecoratedStrategy)
                and _same_definition(plugin.cls, cls)
            })
            saved = [(old, self._pm.get_plugin(old), self._origins[old]) for old in replaced]
            if saved:
                name, origin = saved[0][0], saved[0][2]
                self._drop_plugins(replaced)
            else:
                self._check_plugin_name(name)
                origin = self._in_process_origin(name)
            try:
                self._add_plugin(_DecoratedStrategy(cls), name, origin, strict=True)
            except Exception:
                for old, plugin, old_origin in saved:
                    self._add_plugin(plugin, old, old_origin, strict=True)
                raise
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

    def implementations(self, hook: str) -> list[tuple[Origin, Any]]:
        """Every loaded plugin's implementation of the hook named ``hook`` (a pluggy ``HookImpl``) with
        the plugin's origin: how another registry (the comparison problems') reads the same plugins."""
        with self._lock:
            self.load()
            return [(self._origins.get(impl.plugin_name, Origin(impl.plugin_name)), impl)
                    for impl in getattr(self._pm.hook, hook).get_hookimpls()]

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
            suggestions = list(dict.fromkeys(self._keys[key] for key in close))  # best match first
            hint = f" Did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
            raise UnknownStrategyError(
                f"Unknown strategy {name!r}.{hint} `mtlzoo list` shows every registered strategy."
            )
        return self._entries[canonical]

    def create(self, name: str, /, **kwargs: Any) -> Strategy:
        """Instantiate the strategy called ``name`` with ``kwargs``, after checking their names.

        Raises:
            UnknownStrategyError: No strategy has that name.
            UnknownHyperparameterError: An argument the strategy does not take (with a suggestion).
            MissingHyperparameterError: A required hyperparameter is not given.
        """
        entry = self.get(name)
        _check_hyperparameters(entry.name, entry.cls, kwargs, [e for e in self._entries.values() if e is not entry])
        return entry.cls(**kwargs)

    def list(
        self,
        pattern: str | Iterable[str] = "*",
        *,
        kind: Kind | None = None,
        where: str | None = None,
        exclude: str | Iterable[str] = (),
    ) -> list[StrategyEntry]:
        """Registered strategies whose name or an alias matches ``pattern`` (fnmatch), sorted naturally.

        ``kind`` and ``where`` (``"losses"``, ``"representation"``, ``"parameters"``: where the
        strategy reads gradients by default) filter on the metadata.

        Patterns are case-insensitive and ``-`` matches ``_`` (outside ``[...]`` classes, see
        :func:`normalize_pattern`).
        """
        self.load()
        include = [normalize_pattern(p) for p in ([pattern] if isinstance(pattern, str) else pattern)]
        excluded = [normalize_pattern(p) for p in ([exclude] if isinstance(exclude, str) else exclude)]

        def matches(entry: StrategyEntry, patterns: list[str]) -> bool:
            names = [normalize_name(n) for n in (entry.name, *entry.info.aliases)]
            return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

        chosen = [
            entry for entry in self._entries.values()
            if matches(entry, include) and not matches(entry, excluded)
            and (kind is None or entry.info.kind == kind) and (where is None or entry.info.request.where == where)
        ]
        return sorted(chosen, key=lambda entry: _natural_key(entry.name))


REGISTRY = StrategyRegistry()
"""The process-wide registry behind :func:`create`, :func:`list_strategies` and friends."""


def create(name: str, /, **kwargs: Any) -> Strategy:
    """Create a registered strategy by name.

    Example:
        >>> import mtlzoo
        >>> mtlzoo.create("ls", num_tasks=2, weights=[1.0, 2.0])
        LinearScalarization(num_tasks=2, weights=[1.0, 2.0])

    Raises:
        UnknownStrategyError: No strategy has that name.
        UnknownHyperparameterError: A keyword the strategy does not take; the message suggests the close one.
        MissingHyperparameterError: A required hyperparameter is not given.
    """
    return REGISTRY.create(name, **kwargs)


def get_strategy(name: str) -> StrategyEntry:
    """The registry entry (class, metadata, origin) of a strategy name or alias."""
    return REGISTRY.get(name)


def list_strategies(
    pattern: str | Iterable[str] = "*",
    *,
    kind: Kind | None = None,
    where: str | None = None,
    exclude: str | Iterable[str] = (),
) -> list[StrategyEntry]:
    """List registered strategies, filtered by fnmatch name patterns and metadata.

    Example:
        >>> import mtlzoo
        >>> [entry.name for entry in mtlzoo.list_strategies("roto*")]
        ['rotograd', 'rotograd_norm']
    """
    return REGISTRY.list(pattern, kind=kind, where=where, exclude=exclude)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator registering a strategy in this process, through a small plugin object.

    The entry points are loaded first, so a clash with an installed plugin is always refused.
    Applying it again to the same class, or to a re-definition of it from the same module under
    the same qualified name (a re-run notebook cell, a reloaded module), replaces the earlier
    registration. Run while an entry point is imported, it attributes the strategy to that entry
    point's distribution. ``mtlzoo list`` runs in a process of its own and does not show
    strategies registered this way; call :func:`list_strategies` in this process instead.

    The plugin is named ``"module:QualName[name]"``; remove it with
    ``REGISTRY.unregister_plugin(get_strategy(name).origin.plugin)``.

    Example:
        >>> import mtlzoo
        >>> @mtlzoo.register_strategy
        ... class Halved(mtlzoo.WeightingStrategy):
        ...     info = mtlzoo.StrategyInfo(name="halved", kind="weighting", needs="losses", summary="half each loss")
        ...     def weights(self, losses):
        ...         return losses.new_full((self.num_tasks,), 0.5)
        >>> mtlzoo.create("halved", num_tasks=2).num_tasks
        2
        >>> mtlzoo.registry.REGISTRY.unregister_plugin(mtlzoo.get_strategy("halved").origin.plugin)

    Raises:
        DuplicateStrategyError: Another class already has the name or an alias (both origins are named).
        InvalidStrategyError: ``cls`` is not a strategy class with a valid ``info``.
    """
    REGISTRY.register_class(cls)
    return cls
