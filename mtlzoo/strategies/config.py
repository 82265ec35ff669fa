r"""ConFIG (Liu et al., ICLR 2025): the direction of equal cosine with every task gradient, of projected length."""

from __future__ import annotations

import numpy as np

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import eigh
from mtlzoo.strategy import Paper, StrategyInfo


def conflict_free_weights(gramian: np.ndarray, eps: float) -> np.ndarray:
    r"""ConFIG's weights ``c`` (``d = J^T c``) from the Gramian, in float64.

    With ``D = diag(||g_k||)`` and the cosines ``C = D^+ G D^+`` (the Gramian of the unit rows ``U = D^+ J``), ``pinv(U)
    1 = U^T C^+ 1``: the unit rows' coefficients are ``a = C^+ 1``, eigenvalues of ``C`` within ``K eps λ_max`` of 0
    counting as 0 (rows dependent to rounding), and the raw rows' ``D^+ a``. The update ``(1^T J u) u`` with ``u = J^T
    D^+ a / ||J^T D^+ a||`` is then ``J^T c`` with ``c = D^+ a (1^T G D^+ a) / (a^T C a)``.
    """
    size = gramian.shape[0]
    norms = np.sqrt(np.clip(np.diag(gramian), 0.0, None))
    inverse = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    cosines = gramian * np.outer(inverse, inverse)
    values, vectors = eigh((cosines + cosines.T) / 2)
    kept = values > max(float(values[-1]), 0.0) * size * eps if size else values > 0
    unit_weights = vectors[:, kept] @ (vectors[:, kept].T @ np.ones(size) / values[kept])  # C^+ 1
    weights = inverse * unit_weights
    squared = float(weights @ gramian @ weights)  # ||J^T D^+ a||^2
    if not squared > 0:
        return np.zeros(size)
    return weights * float(gramian.sum(0) @ weights) / squared


class ConFIG(GramianAggregator):
    r"""ConFIG: the update of equal cosine with every task gradient, as long as their projections on it.

    Paper: Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks*, ICLR 2025
    (https://arxiv.org/abs/2408.11104), eq. 2. With ``U`` the unit task gradients ``g_k / ||g_k||`` as rows:

    .. math::

        u = \frac{U^{+} \mathbf 1}{\|U^{+} \mathbf 1\|},\qquad d = \Big(\sum_k g_k \cdot u\Big)\, u .

    Where the gradients are linearly independent, ``U u`` is a positive constant vector: ``u`` makes the same angle with
    every task gradient, so ``d`` conflicts with none. Where they are not (more tasks than dimensions, or dependent
    rows), ``U^+ 1`` is the least-squares solution, as in the authors' code, and conflicts are possible. A weighting of
    the rows: computed on the Gramian (:func:`conflict_free_weights`), ``U^+ 1 = U^T C^+ 1`` with ``C`` the cosines; the
    authors (``conflictfree.grad_operator.ConFIG_update``, their ``lstsq`` by default, or ``pinv``; a closed form for K
    = 2) and torchjd 0.18's ``ConFIG`` (``pinv``, written after theirs) solve on the unit rows. They agree except where
    the rows are dependent to within ``sqrt(K eps)`` of their size, which here count as dependent (the Gramian holds
    them to that precision only; there theirs turns the direction along the residue: a row 1e-10 off a combination of
    two others shrinks their update from 17 to 6e-9). A zero gradient is left out (its unit row is 0, as their
    ``nan_to_num``). Their weight and length models other than the defaults (equal weights, projection length) and the
    momentum variant (M-ConFIG) are not offered.

    Example:
        >>> import torch, mtlzoo
        >>> config = mtlzoo.create("config", num_tasks=2)
        >>> config.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))
        tensor([1.5000, 1.5000])
    """

    info = StrategyInfo(
        name="config",
        summary="The direction of equal cosine with every task gradient, as long as their projections on it.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Qiang Liu", "Mengyu Chu", "Nils Thuerey"),
            title="ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", venue="ICLR", year=2025,
            url="https://arxiv.org/abs/2408.11104",
        ),
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="parameters",
        original_code="https://github.com/tum-pbs/ConFIG",
    )

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        return conflict_free_weights(gramian, step.eps)
