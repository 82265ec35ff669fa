"""Geometric loss strategy: the geometric mean of the losses."""

from __future__ import annotations

from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import check_positive
from mtlzoo.strategy import Paper, StrategyInfo

GLS_PAPER = Paper(
    authors=("Sumanth Chennupati", "Ganesh Sistu", "Senthil Yogamani", "Samir A. Rawashdeh"),
    title="MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning",
    venue="CVPR-W", year=2019, url="https://arxiv.org/abs/1904.08492",
)
TAKES = "takes the product (the geometric mean) of the losses"


class GeometricLossStrategy(LossWeighting):
    r"""Geometric loss strategy (GLS): ``total = (prod_k L_k)^(1/K)``, so ``w_k = total / (K L_k)``.

    Paper: Chennupati, Sistu, Yogamani & Rawashdeh, *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning*, CVPR Workshops 2019 (https://arxiv.org/abs/1904.08492). The geometric mean (taken
    in log space, so it neither overflows nor underflows) makes each task's weight inversely proportional to its loss,
    as SI, times a common factor. With absent tasks, K is the number of present ones. Every present loss must be > 0
    (:class:`~mtlzoo.errors.NonPositiveLossError` otherwise, naming the task).

    Example:
        >>> import torch, mtlzoo
        >>> mtlzoo.create("gls", num_tasks=2).weights(torch.tensor([1.0, 4.0]))
        tensor([1.0000, 0.2500])
    """

    info = StrategyInfo(
        name="gls", aliases=("geometric_mean", "geometric_loss_strategy"),
        summary="Geometric mean of the losses: weights proportional to 1 / L_k.", paper=GLS_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="backward", original_code="",
    )

    def scalarize(self, losses: Tensor) -> Tensor:
        check_positive(losses, self.present_tasks, "GLS (gls)", TAKES)
        return losses.log().mean().exp()
