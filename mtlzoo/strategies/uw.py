"""Uncertainty weighting: learned per-task log-variances."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategy import Paper, StrategyInfo

UW_PAPER = Paper(
    authors=("Alex Kendall", "Yarin Gal", "Roberto Cipolla"),
    title="Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", venue="CVPR",
    year=2018, url="https://arxiv.org/abs/1705.07115",
)


class UncertaintyWeighting(LossWeighting):
    r"""Uncertainty weighting (UW): ``total = sum_k ( exp(-s_k) L_k / 2 + s_k / 2 )``, ``s_k = log sigma_k^2``.

    Paper: Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics*, CVPR 2018 (https://arxiv.org/abs/1705.07115). Each task's homoscedastic noise ``sigma_k^2`` is learned
    through its log ``s_k`` (a parameter, for the user's optimizer, as the paper for stability), from ``total`` with the
    losses held constant; the model learns from ``sum_k w_k L_k`` with ``w_k = exp(-s_k) / 2``. At the optimum of
    ``s_k``, ``sigma_k^2 = L_k``: a task's weight falls as its loss grows. The form is the paper's for regression (a
    Gaussian likelihood), used for every task as in torchjd and LibMTL.

    The log-variances start at 0 (``sigma^2 = 1``, equal weights 1/2), the paper's reported-robust
    choice (LibMTL starts them at -0.5). An absent task's ``s_k`` gets no gradient.

    Example:
        >>> import torch, mtlzoo
        >>> uw = mtlzoo.create("uw", num_tasks=2)
        >>> uw.weights(torch.tensor([1.0, 3.0]))
        tensor([0.5000, 0.5000])
    """

    info = StrategyInfo(
        name="uw", aliases=("uncertainty", "uncertainty_weighting"),
        summary="Learned per-task log-variances s_k: weights exp(-s_k)/2, a regulariser s_k/2.", paper=UW_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), learnable=True, optimizer="adam", lr=1e-2,
        cost="backward", original_code="",
    )
    per_task = ("log_variances",)

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_variances = nn.Parameter(torch.zeros(num_tasks))

    def scalarize(self, losses: Tensor) -> Tensor:
        s = self.present(self.log_variances).to(losses.dtype)
        return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()
