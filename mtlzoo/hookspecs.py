"""The hooks a plugin implements to add strategies (and comparison problems) to mtlzoo.

A plugin is any module or object with a function marked ``@mtlzoo.hookimpl``. Third-party packages
expose theirs through the ``mtlzoo`` entry-point group::

    [project.entry-points.mtlzoo]
    my_plugin = "my_package.mtl_plugin"

The built-in strategies are registered by the internal plugin :mod:`mtlzoo.strategies` through this
very hook, and the built-in comparison problems by :mod:`mtlzoo.harness.problems.builtin` through
``mtlzoo_register_problems``; :mod:`mtlzoo.plugins` calls each plugin's hooks through pluggy.
Implement a hook as a plain function: a hook wrapper
(``@mtlzoo.hookimpl(wrapper=True)`` or ``hookwrapper=True``) is refused (an error in-process, a
:class:`mtlzoo.errors.PluginWarning` for an entry point), since it would register nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "mtlzoo"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    """Register strategy classes by calling ``register(cls)`` once per class.

    Args:
        register: Callback taking a :class:`mtlzoo.strategy.Strategy` subclass with an ``info``
            attribute (:class:`mtlzoo.strategy.StrategyInfo`). It raises
            :class:`mtlzoo.errors.InvalidStrategyError` for a class that is not one (or whose
            ``aliases`` is a str rather than a tuple of names), and refuses a name or alias that is
            already taken.

    Example:
        ```python
        @mtlzoo.hookimpl
        def mtlzoo_register_strategies(register):
            register(MyWeighting)
            register(MySurgery)
        ```
    """


@hookspec
def mtlzoo_register_problems(register: Callable[[type], None]) -> None:
    """Register comparison problems by calling ``register(cls)`` once per class.

    Args:
        register: Callback taking a :class:`mtlzoo.harness.problems.Problem` subclass (a frozen dataclass
            of its settings, with a ``name``); ``mtlzoo compare --problem NAME`` then runs it. A
            name that is already taken is refused (:class:`mtlzoo.errors.DuplicateNameError`), naming both
            origins.

    Example:
        ```python
        @mtlzoo.hookimpl
        def mtlzoo_register_problems(register):
            register(MyProblem)
        ```
    """
