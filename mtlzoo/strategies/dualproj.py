r"""DualProj: the mean task gradient projected onto the dual cone (eq. 11 of GEM, as torchjd names it)."""

from __future__ import annotations

import numpy as np

from mtlzoo.protocol import Request
from mtlzoo.roles import HostStep
from mtlzoo.solvers import dual_cone_weights
from mtlzoo.strategies.upgrad import DualConeSurgery
from mtlzoo.strategy import Paper, StrategyInfo


class DualProj(DualConeSurgery):
    r"""DualProj: the (preference-weighted) mean gradient, projected onto the dual cone of the task gradients.

    Paper: Lopez-Paz & Ranzato, *Gradient Episodic Memory for Continual Learning*, NeurIPS 2017
    (https://arxiv.org/abs/1706.08840), eq. 11 (the projection of a gradient onto the
    directions that increase no other loss), applied to the mean gradient as torchjd names it:

    .. math::

        d = \pi_J\Big(\sum_k p_k g_k\Big) = J^\top v,
        \qquad v = \arg\min_{v \ge p} v^\top G v

    (the dual of GEM's quadratic program), with ``p = 1/K`` by default. ``d`` conflicts with no
    task, is zero at a Pareto-stationary point, and scales with the gradients. Solved exactly
    on the Gramian (:func:`mtlzoo.solvers.project_to_dual_cone`).

    Differences from torchjd 0.18's ``DualProj``: as for :class:`~mtlzoo.strategies.upgrad.UPGrad`,
    the Gramian is scaled to unit trace whatever its size (torchjd zeroes a Gramian of trace below
    1e-4) and ``reg_eps`` defaults to 0 (torchjd adds 1e-4 I); with ``reg_eps=1e-4`` they agree.

    Args:
        pref_vector: K non-negative weights of the combination to project; ``None`` for ``1/K'``
            each over the K' tasks present.
        reg_eps: ``eps`` of ``G / tr(G) + eps I`` (0: the exact projection).

    Example:
        >>> import torch, mtlzoo
        >>> dualproj = mtlzoo.create("dualproj", num_tasks=2)
        >>> dualproj.aggregate(torch.tensor([[1.0, 0.0], [-2.0, 1.0]]), torch.ones(2))
        tensor([0.0000, 0.5000])
    """

    info = StrategyInfo(
        name="dualproj",
        summary="Mean task gradient projected onto the dual cone of the task gradients (GEM's projection).",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("David Lopez-Paz", "Marc'Aurelio Ranzato"),
            title="Gradient Episodic Memory for Continual Learning", venue="NeurIPS", year=2017,
            url="https://arxiv.org/abs/1706.08840"),
        properties=frozenset({"non_conflicting", "permutation_invariant", "scale_linear", "stationary"}),
        cost="parameters", original_code="https://github.com/facebookresearch/GradientEpisodicMemory",
    )

    regularization_breaks = frozenset({"non_conflicting"})

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        unit, weights = self.problem(gramian, step)
        return dual_cone_weights(weights[None], unit)[0]  # project_to_dual_cone's solver, on the host
