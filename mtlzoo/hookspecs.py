"""The hooks a plugin implements to add strategies (and comparison problems) to mtlzoo.

A plugin is any module or object with a function marked ``@mtlzoo.hookimpl``; a package exposes it through the
``mtlzoo`` entry-point group (docs/plugins.md). The built-ins are registered through these very hooks
(:mod:`mtlzoo.strategies`, :mod:`mtlzoo.harness.problems.builtin`). Implement a hook as a plain function: a hook
wrapper (``wrapper=True`` or ``hookwrapper=True``) would register nothing and is refused.
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
            (:class:`mtlzoo.strategy.StrategyInfo`); it raises :class:`mtlzoo.errors.InvalidStrategyError`
            for anything else, and refuses a name or alias that is already taken.

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
        register: Callback taking a :class:`mtlzoo.harness.problems.Problem` subclass (a frozen dataclass of its
            settings, with a ``name``) for ``mtlzoo compare --problem NAME``; it refuses a name that is already taken.

    Example:
        ```python
        @mtlzoo.hookimpl
        def mtlzoo_register_problems(register):
            register(MyProblem)
        ```
    """
