"""The one plugin loader behind every registry: a pluggy ``PluginManager`` named ``mtlzoo``.

A registry (strategies, the harness's comparison problems) plugs in as a :class:`HookTable`. The
loader loads the built-in plugins first (always, and strictly: an error in one is a bug), then the
``mtlzoo`` entry points, lazily (on the first lookup or listing, never on ``import mtlzoo``), unless
``MTLZOO_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value.

**Isolation.** Entry points are loaded one at a time: one that fails to import, implements a hook that has no spec or as
a wrapper, or raises in its hook is dropped whole (from every registry) with a :class:`~mtlzoo.errors.PluginWarning`
naming the entry point and its distribution. A name it registers that is already taken is refused with a warning naming
both origins. A plugin registered in this process (:meth:`PluginLoader.register_plugin`) is refused with an error
instead. Each plugin is also registered in a plugin manager of its own, whose ``pm.hook`` calls only it, so that each
registered class keeps its origin and a plugin that fails is dropped alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy

from mtlzoo import hookspecs
from mtlzoo.errors import DuplicateNameError, InvalidPluginError, PluginWarning

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DISABLE_AUTOLOAD_ENV = "MTLZOO_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class Origin:
    """Where a registered class came from.

    Attributes:
        plugin: The plugin's name in the plugin manager.
        distribution: The installed distribution that provides it (``None`` for built-ins and in-process
            registrations, unless made while an entry point is imported).
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


class HookTable(Protocol):
    """A registry as the loader feeds it: the name of its hook (a spec of :mod:`mtlzoo.hookspecs`), one
    ``register`` callback per plugin, and forgetting a plugin's entries."""

    hook: str

    def register_callback(self, origin: Origin, *, strict: bool) -> Callable[[type], None]:
        """The ``register`` the hook hands to the plugin of ``origin``; ``strict``: raise for a taken name."""
        ...

    def drop_plugin(self, plugin: str) -> None:
        """Forget every entry of the plugin named ``plugin``."""
        ...


class ClassPlugin:
    """The plugin object behind a class decorator (``register_strategy``, ``register_problem``): its one hook,
    the one named ``hook``, hands ``cls`` to that hook's registry."""

    def __init__(self, cls: type, hook: str) -> None:
        self.cls = cls

        def register_class(register: Callable[[type], None]) -> None:
            register(cls)

        setattr(self, hook, hookspecs.hookimpl(register_class))


class PluginLoader:
    """Plugins (built-ins, entry points, in-process ones) and the registries they feed.

    Args:
        entry_points: Returns the ``mtlzoo`` entry points (tests fake it, as pytest's own tests do).
    """

    def __init__(self, entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]]) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._entry_points = entry_points
        self._tables: list[HookTable] = []
        self._builtins: list[tuple[str, Callable[[], object]]] = []
        self._origins: dict[str, Origin] = {}
        self._alone: dict[str, pluggy.PluginManager] = {}
        """Each plugin registered alone: its ``pm.hook`` calls that plugin's implementations only."""
        self.builtins_loaded = False
        self.entry_points_loaded = False
        self.loading: Origin | None = None
        """The entry point being imported, if any: what registers in-process meanwhile is credited to it."""
        self.lock = threading.RLock()

    def add_table(self, table: HookTable, builtin: str, load_builtin: Callable[[], object]) -> None:
        """Feed ``table`` from every plugin, its built-in plugin (the module named ``builtin``) first.

        A table added after the plugins were loaded (the harness's problems, imported later) gets
        its built-in plugin now, then the names of the plugins already loaded.
        """
        with self.lock:
            self._tables.append(table)
            self._builtins.append((builtin, load_builtin))
            if not self.builtins_loaded:
                return
            loaded = [name for name in self._origins]
            self._add_plugin(load_builtin(), builtin, Origin(builtin, builtin=True), strict=True)
            for name in loaded:
                origin = self._origins[name]
                try:
                    self._call(table, name, origin, strict=origin.builtin)
                except Exception as error:  # a plugin's problems failing must not take its strategies down
                    table.drop_plugin(name)
                    warnings.warn(f"mtlzoo could not load the {table.hook} hook of plugin {name!r} ({origin}): "
                                  f"{type(error).__name__}: {error}", PluginWarning, stacklevel=3)

    def _call(self, table: HookTable, name: str, origin: Origin, *, strict: bool) -> None:
        """Call the hook of ``table`` of the plugin named ``name`` alone, through pluggy."""
        caller = getattr(self._alone[name].hook, table.hook)
        for impl in caller.get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                raise InvalidPluginError(
                    f"Plugin {name!r} implements {table.hook} as a hook wrapper; mtlzoo does not support wrappers: "
                    f"drop wrapper=True/hookwrapper=True from its @mtlzoo.hookimpl and call register(cls) directly.")
        caller(register=table.register_callback(origin, strict=strict))

    def load(self) -> None:
        """Load the built-ins and, unless disabled, every ``mtlzoo`` entry point (idempotent)."""
        with self.lock:
            if not self.builtins_loaded:
                self.builtins_loaded = True
                for name, load_builtin in self._builtins:
                    self._add_plugin(load_builtin(), name, Origin(name, builtin=True), strict=True)
            if self.entry_points_loaded:
                return
            self.entry_points_loaded = True
            if os.environ.get(DISABLE_AUTOLOAD_ENV):
                return
            for entry_point in self._entry_points():
                self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        dist = getattr(entry_point, "dist", None)
        distribution, version = (dist.name, dist.version) if dist is not None else (None, None)
        where = f"entry point {entry_point.name!r} ({entry_point.value})" + (
            f" of distribution {distribution!r} {version}" if distribution else "")
        if self.pm.has_plugin(entry_point.name):
            warnings.warn(f"mtlzoo skipped plugin {where}: a plugin named {entry_point.name!r} is already loaded "
                          f"(from {self._origins.get(entry_point.name, 'this process')}).", PluginWarning, stacklevel=4)
            return
        origin = Origin(entry_point.name, distribution, version)
        before, doing = set(self._origins), "import"
        try:
            self.loading = origin  # what register_strategy runs at import is credited to this entry point
            try:
                plugin = entry_point.load()
            finally:
                self.loading = None
            doing = "load"
            self._add_plugin(plugin, entry_point.name, origin, strict=False)
        except Exception as error:  # a broken plugin must not take the others down
            for name in set(self._origins) - before:  # with what it registered in-process at import
                self._drop(name)
            warnings.warn(f"mtlzoo could not {doing} plugin {where}: {type(error).__name__}: {error}", PluginWarning,
                          stacklevel=4)

    def _add_plugin(self, plugin: object, name: str, origin: Origin, *, strict: bool) -> None:
        """Register ``plugin`` with pluggy and call its hooks for every table, undoing it all on failure."""
        self.pm.register(plugin, name=name)
        alone = self._alone[name] = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        alone.add_hookspecs(hookspecs)
        try:
            alone.register(plugin, name=name)
            self.pm.check_pending()
            for table in self._tables:
                self._call(table, name, origin, strict=strict)
        except Exception:
            self._drop(name)
            raise
        self._origins[name] = origin

    def _drop(self, name: str) -> None:
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._origins.pop(name, None)
        self._alone.pop(name, None)
        for table in self._tables:
            table.drop_plugin(name)

    def in_process_origin(self, name: str) -> Origin:
        """The origin of a plugin registered now: in-process, or the entry point being imported."""
        return Origin(name) if self.loading is None else Origin(name, self.loading.distribution, self.loading.version)

    def register_plugin(self, plugin: object, name: str | None = None, origin: Origin | None = None) -> str:
        """Register a plugin object in this process (after loading the entry points); return its name.

        Raises:
            DuplicateNameError: A plugin of that name, or a name the plugin registers, is taken (nothing is kept).
            InvalidPluginError: The plugin implements a hook as a wrapper.
        """
        with self.lock:
            self.load()
            name = name or self.pm.get_canonical_name(plugin)
            if self.pm.has_plugin(name):
                raise DuplicateNameError(f"A plugin named {name!r} is already registered; remove it first with "
                                         f"mtlzoo.registry.REGISTRY.unregister_plugin({name!r}).")
            self._add_plugin(plugin, name, origin or self.in_process_origin(name), strict=True)
            return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered.

        Raises:
            ValueError: ``name`` is a built-in plugin.
            KeyError: No plugin has that name.
        """
        with self.lock:
            if any(name == builtin for builtin, _ in self._builtins):
                raise ValueError(f"The built-in plugin {name!r} cannot be unregistered.")
            if not self.pm.has_plugin(name):
                raise KeyError(f"No plugin named {name!r} is registered.")
            self._drop(name)

    def plugins(self) -> dict[str, Origin]:
        """The loaded plugins and their origins, by plugin name."""
        self.load()
        return dict(self._origins)

    def plugin(self, name: str) -> Any:
        """The plugin object registered as ``name`` (``None`` if none)."""
        return self.pm.get_plugin(name)
