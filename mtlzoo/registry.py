"""The strategy registry: strategies by name (:class:`mtlzoo.names.NameRegistry`), fed by the plugin loader
(:mod:`mtlzoo.plugins`) from the internal plugin :mod:`mtlzoo.strategies` and the ``mtlzoo`` entry points."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mtlzoo.errors import (
    DuplicateStrategyError,
    InvalidStrategyError,
    MissingHyperparameterError,
    UnknownHyperparameterError,
    UnknownStrategyError,
)
from mtlzoo.names import NameRegistry, normalize_name, normalize_pattern, unknown_keywords
from mtlzoo.plugins import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, ClassPlugin, Origin, PluginLoader
from mtlzoo.roles.modifiers import MODIFIERS
from mtlzoo.strategy import REQUIRED, Kind, Strategy, StrategyInfo, hyperparameters, plain

BUILTIN_PLUGIN = "mtlzoo.strategies"
HOOK = "mtlzoo_register_strategies"

__all__ = ["BUILTIN_PLUGIN", "DISABLE_AUTOLOAD_ENV", "ENTRY_POINT_GROUP", "REGISTRY", "Origin", "StrategyEntry",
           "StrategyRegistry", "create", "get_strategy", "list_strategies", "normalize_name", "normalize_pattern",
           "register_strategy"]


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
        info, request, defaults = self.info, self.info.request, self.hyperparameters
        return {
            "name": info.name, "aliases": list(info.aliases), "kind": info.kind, "needs": info.needs,
            "request": {"where": request.where, "statistic": request.statistic,
                        "parameters": plain(request.parameters), "batches": request.batches},
            "summary": info.summary,
            "paper": None if info.paper is None else {**plain(dataclasses.asdict(info.paper)),
                                                      "citation": info.paper.citation()},
            "hyperparameters": {name: None if value is REQUIRED else plain(value) for name, value in defaults.items()},
            "required": [name for name, value in defaults.items() if value is REQUIRED],
            "properties": sorted(info.properties), "suggested": plain(dict(info.suggested)),
            "stochastic": info.stochastic, "learnable": info.learnable,
            "adapts_representation": info.adapts_representation,
            "origin": str(self.origin), "distribution": self.origin.distribution, "version": self.origin.version,
        }


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _same_definition(a: type, b: type) -> bool:
    """Whether ``b`` is ``a`` or a re-definition of it (a re-run notebook cell, a reloaded module): the same
    module, qualified name and strategy name (classes of one factory share a qualified name, not a name)."""
    def identity(cls: type) -> tuple[str, str, str]:
        return cls.__module__, cls.__qualname__, normalize_name(cls.info.name)

    return a is b or identity(a) == identity(b)


def _check_hyperparameters(name: str, cls: type, kwargs: dict[str, Any], others: Iterable[StrategyEntry]) -> None:
    """Refuse keyword arguments that ``cls`` does not take (:class:`~mtlzoo.errors.UnknownHyperparameterError`),
    and required ones that are missing (:class:`~mtlzoo.errors.MissingHyperparameterError`)."""
    parameters = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in parameters if p.kind in by_name]
    accepted = [p.name for p in named]
    listing = ", ".join(p if d is REQUIRED else f"{p}={d!r}" for p, d in hyperparameters(cls).items()) or "none"
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unknown = [] if takes_any else [key for key in kwargs if key not in accepted]
    if unknown:
        def owners(key: str) -> str:
            names = ", ".join(sorted(repr(entry.name) for entry in others if key in entry.hyperparameters))
            return f" ({key!r} is a hyperparameter of {names}.)" if names else ""

        raise UnknownHyperparameterError(
            unknown_keywords(f"Strategy {name!r}", "hyperparameter", unknown, accepted, listing, owners))
    missing = [p.name for p in named if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        suggested = {key: value for key, value in getattr(cls.info, "suggested", {}).items() if key in missing}
        hint = f" (suggested: {', '.join(f'{k}={v!r}' for k, v in suggested.items())})" if suggested else ""
        raise MissingHyperparameterError(
            f"Strategy {name!r} needs the hyperparameter{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))}, which has no default: pass "
            f"{', '.join(f'{p}=...' for p in missing)}{hint}. Its hyperparameters: {listing}."
        )


def _names_of(cls: Any, origin: Origin) -> list[str]:
    """The name and aliases of a strategy class, after checking that it is one (else ``InvalidStrategyError``)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise InvalidStrategyError(f"register() takes a subclass of mtlzoo.Strategy; plugin {origin} passed {cls!r}.")
    info = getattr(cls, "info", None)
    if not isinstance(info, StrategyInfo):
        raise InvalidStrategyError(
            f"Strategy class {cls.__qualname__} (from {origin}) has no `info = StrategyInfo(...)` class attribute.")
    if isinstance(info.aliases, str):
        raise InvalidStrategyError(
            f"Strategy class {cls.__qualname__} (from {origin}) gives `aliases` as a str, which would make "
            f"each character an alias. Write a tuple of names: `aliases=({info.aliases!r},)`.")
    names = [info.name, *info.aliases]
    if not all(isinstance(name, str) and name.strip() for name in names):
        raise InvalidStrategyError(
            f"Strategy class {cls.__qualname__} (from {origin}) should have a non-empty str `name` and a tuple "
            f"of non-empty str `aliases`. Found `name = {info.name!r}`, `aliases = {info.aliases!r}`.")
    keys = [normalize_name(name) for name in names]
    if len(set(keys)) != len(keys):
        raise InvalidStrategyError(f"Strategy {info.name!r} (from {origin}) lists the same name twice: {keys}.")
    return names


class StrategyRegistry:
    """Strategies by name, fed through its own :class:`~mtlzoo.plugins.PluginLoader` (which the comparison
    problems' registry joins). The module-level functions use one instance, :data:`REGISTRY`."""

    hook = HOOK

    def __init__(self) -> None:
        self.names: NameRegistry[StrategyEntry] = NameRegistry(
            "strategy", UnknownStrategyError, duplicate_error=DuplicateStrategyError,
            see_also=lambda names: "`mtlzoo list` shows every registered strategy.")
        self.loader = PluginLoader(lambda: _entry_points())  # looked up at each load: tests fake it
        self.loader.add_table(self, BUILTIN_PLUGIN, lambda: importlib.import_module(BUILTIN_PLUGIN))

    def register_callback(self, origin: Origin, *, strict: bool) -> Callable[[type], None]:
        """The ``register`` that ``mtlzoo_register_strategies`` hands to the plugin of ``origin``."""
        def register(cls: type) -> None:
            names = _names_of(cls, origin)
            self.names.add_from_plugin(StrategyEntry(cls, origin), names[1:], strict=strict)  # type: ignore[arg-type]

        return register

    def drop_plugin(self, plugin: str) -> None:
        self.names.drop_plugin(plugin)

    def load(self) -> None:
        """Load the built-ins and, unless disabled, every ``mtlzoo`` entry point (idempotent)."""
        self.loader.load()

    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object in this process; its strategies (and problems) are available at once.

        Raises:
            DuplicateStrategyError: A strategy of the plugin takes a name already registered (nothing of
                the plugin is kept).
            DuplicateNameError: A problem of the plugin takes a taken problem name, or the plugin's name is taken.
            InvalidPluginError: The plugin's hook is a wrapper.
        """
        return self.loader.register_plugin(plugin, name)

    def register_class(self, cls: type[Strategy]) -> str:
        """Register one strategy class in this process; return the name of the plugin that holds it.

        What :func:`register_strategy` does (see there); raises as it does.
        """
        loader = self.loader
        with loader.lock:
            loader.load()
            info = getattr(cls, "info", None)
            name = f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', repr(cls))}"
            name += f"[{info.name}]" if isinstance(info, StrategyInfo) else ""
            names = _names_of(cls, loader.in_process_origin(name))
            taken = {entry for entry in map(self.names.holder, names) if entry is not None}
            if taken and all(entry.cls is cls for entry in taken):
                return next(iter(taken)).origin.plugin
            replaced = sorted({
                entry.origin.plugin for entry in taken
                if isinstance(plugin := loader.plugin(entry.origin.plugin), ClassPlugin)
                and _same_definition(plugin.cls, cls)
            })
            saved = [(old, loader.plugin(old), loader.plugins()[old]) for old in replaced]
            for old in replaced:
                loader.unregister_plugin(old)
            origin = saved[0][2] if saved else None
            try:
                return loader.register_plugin(ClassPlugin(cls, HOOK), saved[0][0] if saved else name, origin)
            except Exception:
                for old, plugin, old_origin in saved:
                    loader.register_plugin(plugin, old, old_origin)
                raise

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and every strategy (and problem) it registered."""
        self.loader.unregister_plugin(name)

    def plugins(self) -> dict[str, Origin]:
        """The loaded plugins and their origins, by plugin name."""
        return self.loader.plugins()

    def get(self, name: str) -> StrategyEntry:
        """The registered strategy called ``name`` (or one of its aliases).

        Raises:
            UnknownStrategyError: No strategy has that name; the message lists close matches.
        """
        self.load()
        return self.names.get(name)

    def create(self, name: str, /, **kwargs: Any) -> Strategy:
        """Instantiate the strategy called ``name`` with ``kwargs``, after checking their names (see :func:`create`).

        A name ``"modifier(name)"`` wraps the strategy ``name`` in a modifier of
        :mod:`mtlzoo.roles.modifiers` (``"every(mgda)"``, ``"clip_norm(every(upgrad))"``): the
        modifier takes the keyword arguments among its own hyperparameters, the wrapped strategy the others.
        """
        if (modified := _modified_name(name)) is not None:
            return self._create_modified(*modified, kwargs)
        entry = self.get(name)
        _check_hyperparameters(entry.name, entry.cls, kwargs, [e for e in self.names.entries() if e is not entry])
        return entry.cls(**kwargs)

    def _create_modified(self, outer: str, inner: str, kwargs: dict[str, Any]) -> Strategy:
        modifier = MODIFIERS.get(normalize_name(outer))
        if modifier is None:
            close = difflib.get_close_matches(normalize_name(outer), list(MODIFIERS), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownStrategyError(f"No modifier called {outer!r} (in {outer}({inner})).{hint} The modifiers: "
                                       f"{', '.join(sorted(MODIFIERS))}.")
        own = {key: kwargs.pop(key) for key in list(kwargs) if key in hyperparameters(modifier) and key != "inner"}
        wrapped = self.create(inner, **kwargs)
        _check_hyperparameters(outer, modifier, {"inner": wrapped, **own}, [])
        return modifier(wrapped, **own)

    def list(self, pattern: str | Iterable[str] = "*", *, kind: Kind | None = None, where: str | None = None,
             exclude: str | Iterable[str] = ()) -> list[StrategyEntry]:
        """Registered strategies whose name or an alias matches ``pattern`` (fnmatch, case-insensitive, ``-``
        matching ``_``) and none of ``exclude``, sorted naturally; ``kind`` and ``where`` (``"losses"``,
        ``"representation"``, ``"parameters"``: where the strategy reads gradients) filter on the metadata."""
        self.load()
        return [entry for entry in self.names.list(pattern, exclude=exclude, aliases=lambda e: e.info.aliases,
                                                   sort=True)
                if (kind is None or entry.info.kind == kind) and (where is None or entry.info.request.where == where)]


def split_modifiers(name: str) -> tuple[list[str], str]:
    """The modifiers of a name, outermost first, and the strategy they wrap: ``"ema(every(mgda))"`` gives
    ``(["ema", "every"], "mgda")``; a plain name gives ``([], name)``."""
    modifiers: list[str] = []
    while (modified := _modified_name(name)) is not None:
        modifiers.append(modified[0])
        name = modified[1]
    return modifiers, name.strip()


def _modified_name(name: str) -> tuple[str, str] | None:
    """``("every", "mgda")`` for ``"every(mgda)"``; ``None`` for a plain name."""
    text = name.strip()
    if not (text.endswith(")") and "(" in text):
        return None
    outer, _, inner = text[:-1].partition("(")
    return outer.strip(), inner.strip()


REGISTRY = StrategyRegistry()
"""The process-wide registry behind :func:`create`, :func:`list_strategies` and friends."""


def create(name: str, /, **kwargs: Any) -> Strategy:
    """Create a registered strategy by name, with ``kwargs`` its hyperparameters.

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


def list_strategies(pattern: str | Iterable[str] = "*", *, kind: Kind | None = None, where: str | None = None,
                    exclude: str | Iterable[str] = ()) -> list[StrategyEntry]:
    """List registered strategies, filtered by fnmatch name patterns and metadata (see :meth:`StrategyRegistry.list`).

    Example:
        >>> import mtlzoo
        >>> [entry.name for entry in mtlzoo.list_strategies("roto*")]
        ['rotograd', 'rotograd_norm']
    """
    return REGISTRY.list(pattern, kind=kind, where=where, exclude=exclude)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator registering a strategy in this process, through a small plugin object.

    The entry points are loaded first, so a clash with an installed plugin is always refused. Applying it again to the
    same class, or to a re-definition of it (same module, qualified name and strategy name: a re-run notebook cell, a
    reloaded module), replaces the earlier registration, its origin kept. Run while an entry point is imported, it
    attributes the strategy to that entry point's distribution. ``mtlzoo list`` runs in a process of its own and does
    not show such strategies. The plugin is named ``"module:QualName[name]"``; remove it with
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
