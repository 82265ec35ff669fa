"""Linear scalarization: the plain weighted sum of the task losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtlzoo.protocol import StepInputs
from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import per_task_numbers
from mtlzoo.strategy import StrategyInfo


class LinearScalarization(LossWeighting):
    r"""Linear scalarization (LS, also "equal weighting", EW): ``total = sum_k w_k L_k``.

    The baseline every multitask method is measured against: one ordinary backward of a fixed
    weighted sum, ``w_k = 1`` unless given. No paper of its own.

    Args:
        weights: K fixed non-negative weights; ``None`` for all ones.

    Example:
        >>> import torch, mtlzoo
        >>> ls = mtlzoo.create("ls", num_tasks=2, weights=[1.0, 3.0])
        >>> ls.combine(torch.tensor([2.0, 1.0]))
        tensor(5.)
    """

    info = StrategyInfo(
        name="ls", aliases=("ew", "linear_scalarization"),
        summary="Fixed weighted sum of the task losses (all ones by default).",
        properties=frozenset({"permutation_invariant", "scale_linear"}), default_comparison=True, cost="backward",
        original_code="",
    )
    per_task = ("task_weights",)

    def __init__(self, num_tasks: int, weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__(num_tasks)
        values = torch.ones(num_tasks) if weights is None else per_task_numbers(weights, "weights", num_tasks,
                                                                                 non_negative=True)
        self.register_buffer("task_weights", values)
        self._unit_weights: tuple[int, int, bool] | None = None

    def scalarize(self, losses: Tensor) -> Tensor:
        if self._all_ones():
            return losses.sum()  # the same sum, without a product in the step's graph
        return (self.present(self.task_weights).to(losses.dtype) * losses).sum()

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        if self._all_ones():
            return None  # the plain sum: no product in the graph
        return super().loss_weights(inputs)

    def _all_ones(self) -> bool:
        """Whether every weight is 1, re-read only when the buffer is replaced or loaded (a checkpoint)."""
        weights = self.task_weights
        key = (id(weights), self.state.generation)
        if self._unit_weights is None or self._unit_weights[:2] != key:
            self._unit_weights = (*key, bool((weights == 1).all()))
        return self._unit_weights[2]
