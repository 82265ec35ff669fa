"""The comparison problems by name, fed by the same plugins as the strategies.

A plugin adds problems by implementing ``mtlzoo_register_problems(register)`` (see
:mod:`mtlzoo.hookspecs`) beside, or instead of, ``mtlzoo_register_strategies``; the plugins are
the strategy registry's own (:data:`mtlzoo.registry.REGISTRY`: built-ins, then the ``mtlzoo``
entry points, loaded lazily, and in-process registrations). The built-in problems come from the
internal plugin :mod:`mtlzoo.problems`, whose hook this registry always calls first.

Names are case-insensitive and ``-`` equals ``_``; an unknown name raises
:class:`~mtlzoo.errors.UnknownProblemError` listing close matches, a duplicate is refused naming
both origins (a warning for an entry point, whose other problems still load).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtlzoo.errors import (
    DuplicateStrategyError,
    InvalidPluginError,
    PluginWarning,
    UnknownHyperparameterError,
    UnknownProblemError,
)
from mtlzoo.harness.problems.base import Problem
from mtlzoo.hookspecs import hookimpl
from mtlzoo.registry import REGISTRY, Origin, normalize_name

HOOK = "mtlzoo_register_problems"
BUILTIN_ORIGIN = Origin("mtlzoo.problems", builtin=True)


@dataclass(frozen=True)
class ProblemEntry:
    """A registered problem: its class and where it came from."""

    cls: type[Problem]
    origin: Origin

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def settings(self) -> dict[str, Any]:
        """The problem's settings and their defaults."""
        return {f.name: f.default for f in dataclasses.fields(self.cls)}  # type: ignore[arg-type]

    def available(self) -> bool:
        return self.cls.available()

    def to_record(self) -> dict[str, Any]:
        cls = self.cls
        return {
            "name": cls.name, "summary": cls.summary, "source": cls.source, "literature": cls.literature,
            "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better} for m in cls.metrics],
            "delta_m": cls.delta_m, "extra": cls.extra, "available": cls.available(), "in_default": cls.in_default,
            "default_steps": cls.default_steps, "default_seeds": cls.default_seeds,
            "full_steps": cls.full_steps, "full_seeds": cls.full_seeds, "origin": str(self.origin),
        }


def _check_class(cls: Any, origin: Origin) -> str:
    if not (isinstance(cls, type) and issubclass(cls, Problem) and dataclasses.is_dataclass(cls)):
        raise InvalidPluginError(f"register() takes a dataclass subclass of mtlzoo.problems.Problem; plugin {origin} "
                                 f"passed {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise InvalidPluginError(f"Problem class {cls.__qualname__} (from {origin}) has no str `name`.")
    return normalize_name(name)


def _builtin_implementation() -> Callable[..., None]:
    import mtlzoo.harness.problems as builtin

    return builtin.mtlzoo_register_problems


class ProblemRegistry:
    """Problems by name; the table is rebuilt when the set of loaded plugins changes."""

    def __init__(self) -> None:
        self._entries: dict[str, ProblemEntry] = {}
        self._seen: tuple[int, ...] | None = None

    def _refresh(self) -> None:
        implementations = REGISTRY.implementations(HOOK)
        key = tuple(id(impl) for _, impl in implementations)
        if key == self._seen:
            return
        entries: dict[str, ProblemEntry] = {}

        def collect(function: Callable[..., None], argnames: tuple[str, ...], origin: Origin, strict: bool) -> None:
            def register(cls: type) -> None:
                key = _check_class(cls, origin)
                if key in entries and entries[key].cls is not cls:
                    error = DuplicateStrategyError(
                        f"Problem name {key!r} of {cls.__qualname__} (from {origin}) is already taken by "
                        f"{entries[key].cls.__qualname__} (from {entries[key].origin}).")
                    if strict:
                        raise error
                    warnings.warn(f"{error} The problem was not registered.", PluginWarning, stacklevel=2)
                    return
                entries[key] = ProblemEntry(cls, origin)

            function(**{name: register for name in argnames})

        collect(_builtin_implementation(), ("register",), BUILTIN_ORIGIN, strict=True)
        for origin, impl in implementations:
            where = f"plugin {impl.plugin_name!r} ({origin})"
            if impl.wrapper or impl.hookwrapper:
                warnings.warn(f"mtlzoo ignored {where}: it implements {HOOK} as a hook wrapper, which registers "
                              "nothing; drop wrapper=True/hookwrapper=True.", PluginWarning, stacklevel=3)
                continue
            try:
                collect(impl.function, tuple(impl.argnames), origin, strict=False)
            except Exception as error:  # one broken plugin must not hide the others' problems
                warnings.warn(f"mtlzoo could not load the problems of {where}: {type(error).__name__}: {error}",
                              PluginWarning, stacklevel=3)
        self._entries = entries
        self._seen = key

    def get(self, name: str) -> ProblemEntry:
        """The problem called ``name``.

        Raises:
            UnknownProblemError: No problem has that name; the message lists close matches.
        """
        self._refresh()
        if not isinstance(name, str):
            raise TypeError(f"A problem name is a str. Found {name!r}.")
        key = normalize_name(name)
        if key not in self._entries:
            close = difflib.get_close_matches(key, list(self._entries), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownProblemError(f"Unknown problem {name!r}.{hint} The problems: "
                                      f"{', '.join(sorted(self._entries))}.")
        return self._entries[key]

    def list(self) -> list[ProblemEntry]:
        """Every registered problem, built-ins first, in registration order."""
        self._refresh()
        return list(self._entries.values())

    def create(self, name: str, /, **settings: Any) -> Problem:
        """Instantiate the problem ``name`` with ``settings`` (its dataclass fields), after checking their names.

        Raises:
            UnknownProblemError: No problem has that name.
            UnknownHyperparameterError: A setting the problem does not have (with a suggestion).
            ImportError: The problem needs an optional extra that is not installed.
        """
        entry = self.get(name)
        fields = [f.name for f in dataclasses.fields(entry.cls) if f.init]  # type: ignore[arg-type]
        unknown = [key for key in settings if key not in fields]
        if unknown:
            sentences = []
            for key in unknown:
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
                sentences.append(f"Problem {entry.name!r} has no setting {key!r}."
                                 + (f" Did you mean {close[0]!r}?" if close else ""))
            listing = ", ".join(f"{f}={d!r}" for f, d in entry.settings.items()) or "none"
            raise UnknownHyperparameterError(" ".join(sentences) + f" Its settings: {listing}.")
        if not entry.available():
            raise ImportError(entry.cls.missing_message())
        return entry.cls(**settings)


PROBLEMS = ProblemRegistry()
"""The process-wide problem registry."""


def get_problem(name: str) -> ProblemEntry:
    """The registry entry (class, origin) of a problem name."""
    return PROBLEMS.get(name)


def list_problems(*, available_only: bool = False) -> list[ProblemEntry]:
    """The registered problems (``available_only``: those whose optional extra is installed).

    Example:
        >>> from mtlzoo.problems import list_problems
        >>> [entry.name for entry in list_problems()][:2]
        ['toy2d', 'gradnorm_synthetic']
    """
    return [entry for entry in PROBLEMS.list() if entry.available() or not available_only]


def default_problems() -> list[str]:
    """The registered problems marked ``in_default`` whose optional extra (if any) is installed."""
    return [entry.name for entry in list_problems(available_only=True) if entry.cls.in_default]


def create_problem(name: str, /, **settings: Any) -> Problem:
    """Create a registered problem by name.

    Example:
        >>> from mtlzoo.problems import create_problem
        >>> create_problem("gradnorm_synthetic", num_tasks=10).scales[:3]
        (48.0, 3.0, 54.0)
    """
    return PROBLEMS.create(name, **settings)


class _DecoratedProblem:
    def __init__(self, cls: type) -> None:
        self.cls = cls

    @hookimpl
    def mtlzoo_register_problems(self, register: Callable[[type], None]) -> None:
        register(self.cls)


def register_problem(cls: type[Problem]) -> type[Problem]:
    """Class decorator registering a problem in this process (a small plugin of the strategy registry).

    Registering the class again, or a re-definition of it (same module and qualified name: a re-run
    notebook cell), replaces the earlier registration. The plugin is named ``"module:QualName[problem]"``;
    remove it with ``mtlzoo.registry.REGISTRY.unregister_plugin(name)``.

    Raises:
        DuplicateStrategyError: Another problem class already has the name (both origins are named).
    """
    key = _check_class(cls, Origin("in-process"))
    plugin_name = f"{cls.__module__}:{cls.__qualname__}[problem]"
    PROBLEMS._refresh()
    existing = PROBLEMS._entries.get(key)
    if existing is not None and existing.origin.plugin != plugin_name:
        raise DuplicateStrategyError(f"Problem name {cls.name!r} of {cls.__qualname__} (in-process) is already taken "
                                     f"by {existing.cls.__qualname__} (from {existing.origin}).")
    if plugin_name in REGISTRY.plugins():
        REGISTRY.unregister_plugin(plugin_name)
    REGISTRY.register_plugin(_DecoratedProblem(cls), name=plugin_name)
    return cls


__all__ = ["PROBLEMS", "ProblemEntry", "ProblemRegistry", "create_problem", "default_problems", "get_problem",
           "list_problems", "register_problem"]
