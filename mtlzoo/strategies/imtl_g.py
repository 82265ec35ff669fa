r"""IMTL-G (Liu et al., ICLR 2021): the combination of the task gradients with equal projections on each."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.solvers import from_host, lstsq, to_host, unit_trace
from mtlzoo.strategies._surgery import GramianSurgery
from mtlzoo.strategy import Paper, StrategyInfo, Target

IMTL_PAPER = Paper(
    authors=("Liyang Liu", "Yi Li", "Zhanghui Kuang", "Jing-Hao Xue", "Yimin Chen", "Wenming Yang", "Qingmin Liao",
             "Wayne Zhang"),
    title="Towards Impartial Multi-task Learning",
    venue="ICLR",
    year=2021,
    url="https://openreview.net/forum?id=IMPnRXEWpvr",
)


def equal_projection_weights(gramian: Tensor) -> Tensor:
    r"""IMTL-G's weights ``a`` for a Gramian: ``sum_k a_k = 1`` and ``d = J^T a`` with ``d . u_k`` equal for all k.

    With ``u_k = g_k / ||g_k||`` the conditions read ``G a = t n`` (``n_k = ||g_k||``) and
    ``1^T a = 1``, a (K+1) x (K+1) linear system in ``(a, t)``, solved in float64 on the
    unit-trace Gramian by the pseudo-inverse (the minimum-norm least-squares solution where it is
    singular; the cut-off is the input dtype's rounding). Tasks whose gradient is zero have no
    direction to be impartial to: they take weight 0 and the others share the sum of 1.
    """
    return from_host(equal_projection_host(to_host(gramian), float(torch.finfo(gramian.dtype).eps)), gramian)


def equal_projection_host(matrix: np.ndarray, eps: float) -> np.ndarray:
    """:func:`equal_projection_weights` on a float64 host Gramian computed in a dtype of rounding unit ``eps``:
    the system is solved by :func:`mtlzoo.solvers.lstsq` with the cut-off of the pseudo-inverse."""
    unit = unit_trace(matrix)
    norms = np.sqrt(np.clip(np.diag(unit), 0.0, None))
    weights = np.zeros(len(norms))
    present = norms > 0
    count = int(present.sum())
    if count == 0:
        return weights
    system = np.zeros((count + 1, count + 1))
    system[:count, :count] = unit[np.ix_(present, present)] if count < len(norms) else unit
    system[:count, count] = -norms[present]
    system[count, :count] = 1.0
    rhs = np.zeros(count + 1)
    rhs[count] = 1.0
    weights[present] = lstsq(system, rhs, cutoff=10 * (count + 1) * eps)[:count]
    return weights


class IMTLG(GramianSurgery):
    r"""IMTL-G: weights summing to one whose combined gradient has equal projections on every task's direction.

    Paper: Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021
    (https://openreview.net/forum?id=IMPnRXEWpvr), Section 3.2. With ``u_k = g_k / ||g_k||``:

    .. math::

        d = \sum_k a_k g_k,\quad \sum_k a_k = 1,\quad d \cdot u_1 = d \cdot u_2 = \dots = d \cdot u_K,

    whose closed form is the paper's ``a_{2:K} = g_1 U^\top (D U^\top)^{-1}`` (``D``, ``U`` the
    differences ``g_1 - g_k``, ``u_1 - u_k``), ``a_1 = 1 - \sum_{k>1} a_k``. Here the same
    conditions are solved on the Gramian as one linear system (``G a = t ||g||``, ``1^T a = 1``,
    see :func:`equal_projection_weights`), which gives the paper's weights whenever its inverse
    exists, and otherwise the minimum-norm least-squares solution of the same conditions: with
    linearly dependent rows the only update with equal projections is often ``d = 0``, which is
    what it then returns (two opposite gradients give 0, whatever their sizes). The weights do
    not depend on the gradients' scale.

    The paper computes the task gradients on the shared representation ``z`` (Algorithm 1: "the
    gradient of shared feature"), so ``target="representation"`` is the default here.

    Differences from torchjd 0.18's ``IMTLG``, which takes ``a = G^+ n / 1^T G^+ n``: identical
    weights when the Gramian is invertible; with linearly dependent rows torchjd's update can
    break the equal projections (``g_1 = e_1``, ``g_2 = -2 e_1`` give ``d = -5 e_1``, which
    increases the first loss), where this one keeps them. torchjd returns zero weights when
    ``1^T G^+ n < 1e-12`` in absolute value; here no absolute threshold applies.

    Args:
        num_tasks: K.
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.

    Example:
        >>> import torch, mtlzoo
        >>> imtl_g = mtlzoo.create("imtl_g", num_tasks=2)
        >>> imtl_g.aggregate(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.ones(2))
        tensor([0.7500, 0.7500])
    """

    info = StrategyInfo(
        name="imtl_g",
        kind="surgery",
        summary="Weights summing to one whose combined gradient projects equally on every task's direction.",
        request=Request("representation", "gramian"),
        paper=IMTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        cost="representation",
        original_code="",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks, target=target)

    def host_weights(self, matrix: np.ndarray, eps: float, losses: Tensor, tasks: Tensor,
                     micro_batch: int) -> np.ndarray:
        return equal_projection_host(matrix, eps)
