"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning, learned loss scales."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategy import Paper, StrategyInfo

IMTL_PAPER = Paper(
    authors=("Liyang Liu", "Yi Li", "Zhanghui Kuang", "Jing-Hao Xue", "Yimin Chen", "Wenming Yang", "Qingmin Liao",
             "Wayne Zhang"), title="Towards Impartial Multi-task Learning", venue="ICLR", year=2021,
    url="https://openreview.net/forum?id=IMPnRXEWpvr",
)


def imtl_l_total(losses: Tensor, log_scales: Tensor) -> Tensor:
    """IMTL-L's scalarization ``sum_k ( exp(s_k) L_k - s_k )`` (differentiable in both)."""
    return (torch.exp(log_scales) * losses - log_scales).sum()


class IMTLL(LossWeighting):
    r"""IMTL-L: learned loss scales, ``total = sum_k ( exp(s_k) L_k - s_k )``.

    The loss-balancing half of Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021
    (https://openreview.net/forum?id=IMPnRXEWpvr). Each task's scale ``exp(s_k)`` is learned (``s_k`` a parameter, for
    the user's optimizer) from ``total`` with the losses held constant, so that the scaled losses ``exp(s_k) L_k`` all
    tend to 1 (the optimum of ``s_k`` is ``-log L_k``); the ``-s_k`` term keeps ``s_k`` from falling to minus infinity.
    The model learns from ``sum_k w_k L_k`` with ``w_k = exp(s_k)``. The scales start at 0 (equal weights 1), as the
    paper; ``imtl`` composes this weighting with IMTL-G. An absent task's ``s_k`` gets no gradient.

    Example:
        >>> import torch, mtlzoo
        >>> imtl = mtlzoo.create("imtl_l", num_tasks=2)
        >>> imtl.scalarize(torch.tensor([2.0, 3.0]))
        tensor(5., grad_fn=<SumBackward0>)
    """

    info = StrategyInfo(
        name="imtl_l", aliases=("imtll",),
        summary="Learned loss scales exp(s_k) that drive every scaled loss towards 1.", paper=IMTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), learnable=True, optimizer="adam", lr=1e-2,
        cost="backward", original_code="",
    )
    per_task = ("log_scales",)

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.log_scales = nn.Parameter(torch.zeros(num_tasks))

    def scalarize(self, losses: Tensor) -> Tensor:
        return imtl_l_total(losses, self.present(self.log_scales).to(losses.dtype))
