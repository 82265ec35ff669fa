"""Scale-invariant loss: the sum of the log-losses."""

from __future__ import annotations

from torch import Tensor

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import check_positive, check_rate
from mtlzoo.strategy import Paper, StrategyInfo

NASH_MTL_PAPER = Paper(
    authors=("Aviv Navon", "Aviv Shamsian", "Idan Achituve", "Haggai Maron", "Kenji Kawaguchi", "Gal Chechik",
             "Ethan Fetaya"), title="Multi-Task Learning as a Bargaining Game", venue="ICML", year=2022,
    url="https://arxiv.org/abs/2202.01017",
)
TAKES = "takes the log of each loss"


class ScaleInvariant(LossWeighting):
    r"""Scale-invariant loss (SI): ``total = sum_k log(L_k + eps)``, so ``w_k = 1 / (L_k + eps)``.

    The baseline of Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022
    (https://arxiv.org/abs/2202.01017): each task's gradient is divided by its loss, so scaling a
    loss by a constant changes nothing (``eps = 0``, the default). No state. Every present
    ``L_k + eps`` must be > 0 (:class:`~mtlzoo.errors.NonPositiveLossError` otherwise, naming the
    task). DB-MTL's authors take ``log(L_k + 1e-8)`` (``eps=1e-8``).

    Args:
        eps: A non-negative constant added to each loss before its log (0: the paper's SI).

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

    def __init__(self, num_tasks: int, eps: float = 0.0) -> None:
        super().__init__(num_tasks)
        self.eps = check_rate(eps, "eps")

    def scalarize(self, losses: Tensor) -> Tensor:
        shifted = losses + self.eps if self.eps else losses
        check_positive(shifted, self.present_tasks, f"SI (si, eps={self.eps:g})" if self.eps else "SI (si)", TAKES)
        return shifted.log().sum()
