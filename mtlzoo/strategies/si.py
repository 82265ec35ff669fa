"""Scale-invariant loss: the sum of the log-losses."""

from __future__ import annotations

from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import check_positive
from mtlzoo.strategy import Paper, StrategyInfo

NASH_MTL_PAPER = Paper(
    authors=("Aviv Navon", "Aviv Shamsian", "Idan Achituve", "Haggai Maron", "Kenji Kawaguchi", "Gal Chechik",
             "Ethan Fetaya"), title="Multi-Task Learning as a Bargaining Game", venue="ICML", year=2022,
    url="https://arxiv.org/abs/2202.01017",
)
TAKES = "takes the log of each loss"


class ScaleInvariant(LossWeighting):
    r"""Scale-invariant loss (SI): ``total = sum_k log L_k``, so ``w_k = 1 / L_k``.

    The baseline of Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022
    (https://arxiv.org/abs/2202.01017): each task's gradient is divided by its loss, so scaling a
    loss by a constant changes nothing. No hyperparameters, no state. Every present loss must be
    > 0 (:class:`~mtlzoo.errors.NonPositiveLossError` otherwise, naming the task).

    Example:
        >>> import torch, mtlzoo
        >>> mtlzoo.create("si", num_tasks=2).weights(torch.tensor([0.5, 4.0]))
        tensor([2.0000, 0.2500])
    """

    info = StrategyInfo(
        name="si", aliases=("scale_invariant",),
        summary="Sum of the log-losses: each task's gradient divided by its loss.", paper=NASH_MTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="backward",
        original_code="https://github.com/AvivNavon/nash-mtl",
    )

    def scalarize(self, losses: Tensor) -> Tensor:
        check_positive(losses, self.present_tasks, "SI (si)", TAKES)
        return losses.log().sum()
