"""The parameters of a module, listed once and reused until some module's structure changes.

``nn.Module.parameters()`` walks every submodule, which costs more per training step than the
arithmetic of a small strategy. The lists here are cached per module and dropped whenever any
module registers a parameter, a buffer or a submodule (torch's global registration hooks), and
when :func:`invalidate` is called (the wrapper calls it from ``_apply``, which may replace
parameters without registering them). ``requires_grad`` is read at each use, never cached.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

_version = 0
_cache: weakref.WeakKeyDictionary[nn.Module, tuple[int, dict[str, nn.Parameter]]] = weakref.WeakKeyDictionary()


def invalidate(*_: Any) -> None:
    """Forget every cached list (some module's structure may have changed)."""
    global _version
    _version += 1


register_module_parameter_registration_hook(invalidate)
register_module_buffer_registration_hook(invalidate)
register_module_module_registration_hook(invalidate)


def named_parameters_of(module: nn.Module) -> dict[str, nn.Parameter]:
    """``dict(module.named_parameters())``, cached until a structural change (do not mutate it)."""
    cached = _cache.get(module)
    if cached is not None and cached[0] == _version:
        return cached[1]
    named = dict(module.named_parameters())
    _cache[module] = (_version, named)
    return named


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    """The parameters of ``module`` that require grad now, in ``module.parameters()`` order."""
    return [p for p in named_parameters_of(module).values() if p.requires_grad]
