"""The comparison problems by name: a :class:`~mtlzoo.names.NameRegistry` fed through the hook
``mtlzoo_register_problems`` by the plugins of :data:`mtlzoo.registry.REGISTRY`'s loader (the built-ins from
:mod:`mtlzoo.harness.problems.builtin`); names behave as strategy names do."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtlzoo.errors import InvalidPluginError, UnknownHyperparameterError, UnknownProblemError
from mtlzoo.harness.problems.base import Problem
from mtlzoo.names import NameRegistry, unknown_keywords
from mtlzoo.plugins import ClassPlugin, Origin, PluginLoader
from mtlzoo.registry import REGISTRY

HOOK = "mtlzoo_register_problems"
BUILTIN_PLUGIN = "mtlzoo.harness.problems.builtin"


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


def _check_class(cls: Any, origin: Origin) -> type[Problem]:
    if not (isinstance(cls, type) and issubclass(cls, Problem) and dataclasses.is_dataclass(cls)):
        raise InvalidPluginError(f"register() takes a dataclass subclass of mtlzoo.harness.problems.Problem; plugin "
                                 f"{origin} passed {cls!r}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise InvalidPluginError(f"Problem class {cls.__qualname__} (from {origin}) has no str `name`.")
    return cls


class ProblemRegistry:
    """Problems by name, fed through ``mtlzoo_register_problems`` by the plugins of ``loader``."""

    hook = HOOK

    def __init__(self, loader: PluginLoader) -> None:
        self.loader = loader
        self.names: NameRegistry[ProblemEntry] = NameRegistry(
            "problem", UnknownProblemError,
            see_also=lambda names: f"The problems: {', '.join(sorted(names))}.")
        loader.add_table(self, BUILTIN_PLUGIN, lambda: importlib.import_module(BUILTIN_PLUGIN))

    def register_callback(self, origin: Origin, *, strict: bool) -> Callable[[type], None]:
        """The ``register`` that ``mtlzoo_register_problems`` hands to the plugin of ``origin``."""
        def register(cls: type) -> None:
            self.names.add_from_plugin(ProblemEntry(_check_class(cls, origin), origin), strict=strict)

        return register

    def drop_plugin(self, plugin: str) -> None:
        self.names.drop_plugin(plugin)

    def get(self, name: str) -> ProblemEntry:
        """The problem called ``name`` (else :class:`~mtlzoo.errors.UnknownProblemError`, listing close matches)."""
        self.loader.load()
        return self.names.get(name)

    def list(self) -> list[ProblemEntry]:
        """Every registered problem, built-ins first, in registration order."""
        self.loader.load()
        return self.names.entries()

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
            listing = ", ".join(f"{f}={d!r}" for f, d in entry.settings.items()) or "none"
            raise UnknownHyperparameterError(unknown_keywords(f"Problem {entry.name!r}", "setting", unknown, fields,
                                                             listing))
        if not entry.available():
            raise ImportError(entry.cls.missing_message())
        return entry.cls(**settings)


PROBLEMS = ProblemRegistry(REGISTRY.loader)
"""The process-wide problem registry (on the plugin loader of :data:`mtlzoo.registry.REGISTRY`)."""


def get_problem(name: str) -> ProblemEntry:
    """The registry entry (class, origin) of a problem name."""
    return PROBLEMS.get(name)


def list_problems(*, available_only: bool = False) -> list[ProblemEntry]:
    """The registered problems (``available_only``: those whose optional extra is installed).

    Example:
        >>> from mtlzoo.harness.problems import list_problems
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
        >>> from mtlzoo.harness.problems import create_problem
        >>> create_problem("gradnorm_synthetic", num_tasks=10).scales[:3]
        (48.0, 3.0, 54.0)
    """
    return PROBLEMS.create(name, **settings)


def register_problem(cls: type[Problem]) -> type[Problem]:
    """Class decorator registering a problem in this process (a small plugin of the plugin loader).

    Registering the class again, or a re-definition of it (same module and qualified name: a re-run
    notebook cell), replaces the earlier registration. The plugin is named ``"module:QualName[problem]"``;
    remove it with ``mtlzoo.registry.REGISTRY.unregister_plugin(name)``.

    Raises:
        DuplicateNameError: Another problem class already has the name (both origins are named).
    """
    loader = PROBLEMS.loader
    plugin_name = f"{cls.__module__}:{cls.__qualname__}[problem]"
    origin = loader.in_process_origin(plugin_name)
    entry = ProblemEntry(_check_class(cls, origin), origin)
    with loader.lock:
        loader.load()
        existing = PROBLEMS.names.holder(cls.name)
        if existing is not None and existing.origin.plugin != plugin_name:
            PROBLEMS.names.check_free(entry, [cls.name])  # raises, naming both
        if plugin_name in loader.plugins():
            loader.unregister_plugin(plugin_name)
        loader.register_plugin(ClassPlugin(cls, HOOK), name=plugin_name)
    return cls


__all__ = ["BUILTIN_PLUGIN", "PROBLEMS", "ProblemEntry", "ProblemRegistry", "create_problem", "default_problems",
           "get_problem", "list_problems", "register_problem"]
