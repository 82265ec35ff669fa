"""The trainable parameters of a module, listed afresh at each use (a cache would need process-wide
module-registration hooks to know when a module's structure changes; listing costs microseconds)."""

from __future__ import annotations

from torch import Tensor, nn

from mtlzoo.engine.internals import parameters_of


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    """The parameters of ``module`` that require grad now, in ``module.parameters()`` order."""
    return [p for p in parameters_of(module) if p.requires_grad]
