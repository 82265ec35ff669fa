r"""IMTL-G (Liu et al., ICLR 2021): the combination of the task gradients with equal projections on each."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import from_host, lstsq, to_host
from mtlzoo.strategies.imtl_l import IMTL_PAPER
from mtlzoo.strategy import StrategyInfo, Target


def equal_projection_weights(gramian: Tensor) -> Tensor:
    r"""IMTL-G's weights ``a`` for a Gramian: ``sum_k a_k = 1`` and ``d = J^T a`` with ``d . u_k`` equal for all k.

    With ``u_k = g_k / ||g_k||`` the conditions read ``G a = t n`` (``n_k = ||g_k||``) and ``1^T a = 1``; in
    ``b = n * a`` they are ``C b = t 1`` on the cosines ``C = D^-1 G D^-1`` (``D = diag(n)``, each known to the
    rounding of the Gramian's dtype whatever the gradients' sizes), with ``sum_k b_k / n_k = 1``: a bordered
    system solved in float64 by the pseudo-inverse with the cut-off ``(K + 1) eps`` of that dtype. Tasks whose
    gradient is zero take weight 0 and the others share the sum of 1.
    """
    return from_host(equal_projection_host(to_host(gramian), float(torch.finfo(gramian.dtype).eps)), gramian)


def equal_projection_host(matrix: np.ndarray, eps: float) -> np.ndarray:
    """:func:`equal_projection_weights` on a float64 host Gramian computed in a dtype of rounding unit ``eps``."""
    norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))
    weights = np.zeros(len(norms))
    present = np.flatnonzero(norms > 0)
    count = len(present)
    if count == 0:
        return weights
    sizes = norms[present]
    inverse = 1.0 / sizes
    largest = float(inverse.max())
    system = np.zeros((count + 1, count + 1))
    system[:count, :count] = matrix[np.ix_(present, present)] / np.outer(sizes, sizes)
    system[:count, count] = -1.0
    system[count, :count] = inverse / largest  # sum_k b_k / n_k = 1, divided by its largest coefficient
    rhs = np.zeros(count + 1)
    rhs[count] = 1.0 / largest
    weights[present] = lstsq(system, rhs, cutoff=(count + 1) * eps)[:count] * inverse
    return weights


class IMTLG(GramianAggregator):
    r"""IMTL-G: weights summing to one whose combined gradient has equal projections on every task's direction.

    Paper: Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021
    (https://openreview.net/forum?id=IMPnRXEWpvr), Section 3.2. With ``u_k = g_k / ||g_k||``:

    .. math::

        d = \sum_k a_k g_k,\quad \sum_k a_k = 1,\quad d \cdot u_1 = d \cdot u_2 = \dots = d \cdot u_K,

    whose closed form is the paper's ``a_{2:K} = g_1 U^\top (D U^\top)^{-1}`` (``D``, ``U`` the differences ``g_1 -
    g_k``, ``u_1 - u_k``), ``a_1 = 1 - \sum_{k>1} a_k``. Here the same conditions are solved on the Gramian as one
    linear system (:func:`equal_projection_weights`), which gives the paper's weights whenever the Gramian determines
    them (in float32 too), and otherwise the minimum-norm least-squares solution: with linearly dependent rows the only
    update with equal projections is often ``d = 0`` (two opposite gradients give 0, whatever their sizes). The weights
    do not depend on the gradients' scale.

    Differences from torchjd 0.18's ``IMTLG``, which takes ``a = G^+ n / 1^T G^+ n``: identical weights when the Gramian
    is invertible; with linearly dependent rows torchjd's update can break the equal projections (``g_1 = e_1``, ``g_2 =
    -2 e_1`` give ``d = -5 e_1``, which increases the first loss), where this one keeps them. torchjd returns zero
    weights when ``1^T G^+ n < 1e-12`` in absolute value; here no absolute threshold applies.

    Args:
        target: ``"representation"`` (default, as the paper's Algorithm 1: "the gradient of shared
            feature") or ``"parameters"``.

    Example:
        >>> import torch, mtlzoo
        >>> imtl_g = mtlzoo.create("imtl_g", num_tasks=2)
        >>> imtl_g.aggregate(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.ones(2))
        tensor([0.7500, 0.7500])
    """

    info = StrategyInfo(
        name="imtl_g",
        summary="Weights summing to one whose combined gradient projects equally on every task's direction.",
        request=Request("representation", "gramian"), paper=IMTL_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="representation", original_code="",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks, target=target)

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return equal_projection_host(gramian, step.eps)
