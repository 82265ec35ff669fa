"""The built-in strategies, and the internal plugin that registers them.

This module is registered with the plugin manager like any third-party plugin: its hook
implementation hands every built-in class to the registry through ``register``.
"""

from __future__ import annotations

from collections.abc import Callable

from mtlzoo.hookspecs import hookimpl
from mtlzoo.strategies.ls import LinearScalarization
from mtlzoo.strategies.rotograd import RotateOnly, RotoGrad, RotoGradNorm

BUILTIN_STRATEGIES = (LinearScalarization, RotateOnly, RotoGrad, RotoGradNorm)

__all__ = ["BUILTIN_STRATEGIES", "LinearScalarization", "RotateOnly", "RotoGrad", "RotoGradNorm"]


@hookimpl
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    for cls in BUILTIN_STRATEGIES:
        register(cls)
