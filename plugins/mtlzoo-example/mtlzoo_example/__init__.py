"""An example mtlzoo plugin, written against the documented surface only, registered through the ``mtlzoo`` entry point.

Three strategies, one per pattern a plugin author needs:

- :class:`MeanLoss`: a loss weighting with no state (one method, ``scalarize``);
- :class:`RunningScale`: a stateful loss weighting (declared running state, advanced per optimizer step);
- :class:`EqualNorm`: a Gramian aggregator (one method, ``weigh``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

import mtlzoo
import mtlzoo.roles


class MeanLoss(mtlzoo.LossWeighting):
    """The arithmetic mean of the task losses, ``total = (1/K) sum_k L_k`` (a worked example, no paper)."""

    info = mtlzoo.StrategyInfo(
        name="mean_loss",
        aliases=("example_mean",),
        summary="Arithmetic mean of the task losses (example plugin).",
        properties=frozenset({"permutation_invariant", "scale_linear"}),
    )

    def scalarize(self, losses: Tensor) -> Tensor:
        return losses.sum() / self.num_tasks


class RunningScale(mtlzoo.LossWeighting):
    r"""Each loss divided by a running average of its own past values (a worked example, no paper).

    .. math::

        \text{total} = \sum_k L_k / m_k, \qquad m_k \leftarrow \beta m_k + (1 - \beta) L_k

    ``m_k`` is updated once per optimizer step, from the step's first micro-batch, and starts at
    the first step's losses (the first step reads them back from what it staged). Running state:
    ``m`` (``scales``, a tensor: a buffer), the step's losses and the number of steps taken
    (``steps``, an int: extra state), declared once; the base class stages, commits, drops and
    saves them.

    Args:
        num_tasks: K.
        beta: The averaging factor in ``[0, 1)``.
    """

    info = mtlzoo.StrategyInfo(
        name="running_scale",
        summary="Each loss divided by a running average of its past values (example plugin).",
        properties=frozenset({"permutation_invariant"}),
    )

    def __init__(self, num_tasks: int, beta: float = 0.9) -> None:
        super().__init__(num_tasks)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"Parameter `beta` should be a number in [0, 1). Found `beta = {beta!r}`.")
        self.beta = float(beta)
        self.declare_state(scales=torch.ones(num_tasks), last_losses=torch.ones(num_tasks), steps=0)

    def scalarize(self, losses: Tensor) -> Tensor:
        self.state.last_losses = losses.detach()  # staged: only the step's first micro-batch writes it
        scales = self.state.scales if self.state.steps else self.state.last_losses  # the staged value
        return (losses / scales.to(losses.dtype)).sum()

    def on_advance(self) -> None:
        losses = self.state.last_losses
        self.state.scales = self.beta * self.state.scales + (1 - self.beta) * losses if self.state.steps else losses
        self.state.steps += 1


class EqualNorm(mtlzoo.GramianAggregator):
    r"""Every task gradient rescaled to the mean norm, then summed (a worked example, no paper).

    .. math::

        d = \sum_k c_k g_k, \qquad c_k = \bar n / \|g_k\|, \quad \|g_k\| = \sqrt{G_{kk}},
        \quad \bar n = \tfrac{1}{K} \sum_j \|g_j\|

    A zero gradient gets weight 0. Written on the Gramian, so it runs on both targets, and on the
    parameters the engine never forms the K x n Jacobian.
    """

    info = mtlzoo.StrategyInfo(
        name="equal_norm",
        summary="Task gradients rescaled to their mean norm, then summed (example plugin).",
        request=mtlzoo.Request("representation", "gramian"),
        properties=frozenset({"permutation_invariant", "scale_linear"}),
    )

    def weigh(self, gramian: np.ndarray, step: mtlzoo.roles.HostStep) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
        weights = np.zeros_like(norms)
        nonzero = norms > 0
        weights[nonzero] = norms.mean() / norms[nonzero]
        return weights


@mtlzoo.hookimpl
def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
    register(MeanLoss)
    register(RunningScale)
    register(EqualNorm)
