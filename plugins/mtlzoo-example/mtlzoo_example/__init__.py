"""An example mtlzoo plugin: the mean of the task losses, registered through the ``mtlzoo`` entry point."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

import mtlzoo


class MeanLoss(mtlzoo.WeightingStrategy):
    """The arithmetic mean of the task losses, ``total = (1/K) sum_k L_k`` (a worked example, no paper)."""

    info = mtlzoo.StrategyInfo(
        name="mean_loss",
        aliases=("example_mean",),
        kind="weighting",
        needs="losses",
        summary="Arithmetic mean of the task losses (example plugin).",
        properties=frozenset({"permutation_invariant", "scale_linear"}),
    )

    def weights(self, losses: Tensor) -> Tensor:
        return losses.new_full((self.num_tasks,), 1.0 / self.num_tasks)


@mtlzoo.hookimpl
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    register(MeanLoss)
