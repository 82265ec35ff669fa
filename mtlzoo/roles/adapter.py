"""The adapter role: a per-task transform of the shared representation, learned from the task gradients."""

from __future__ import annotations

from torch import Tensor

from mtlzoo.protocol import StepInputs, Update
from mtlzoo.strategy import Strategy


class Adapter(Strategy):
    """A strategy that gives each task its own view ``z_k = adapt(z, k)`` of the representation.

    The one method is :meth:`adapt`; an adapter that learns (RotoGrad's rotations) reads the task gradients on ``z``
    (``Request("representation")``) and returns its own objective from :meth:`compute`. Alone, the shared part receives
    the plain sum of the task gradients; under :func:`mtlzoo.compose` an aggregator combines them.
    """

    role = "adapter"

    def adapt(self, z: Tensor, task: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} should implement `adapt`.")

    def compute(self, inputs: StepInputs) -> Update:
        return Update()
