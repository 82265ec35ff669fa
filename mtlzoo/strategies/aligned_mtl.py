r"""Aligned-MTL (Senushkin et al., CVPR 2023): align the task gradients' principal components, then combine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import eigh, from_host, to_host
from mtlzoo.strategies.upgrad import preference
from mtlzoo.strategy import Paper, StrategyInfo, Target

ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES: tuple[ScaleMode, ...] = ("min", "median", "rmse")


def balance_transformation(gramian: Tensor, scale_mode: ScaleMode = "min") -> Tensor:
    r"""Aligned-MTL's K x K balance matrix ``B = sqrt(s) V Λ^{-1/2} V^T`` of the Gramian ``G = V Λ V^T``.

    The eigenvalues at or below ``λ_max K eps`` (``eps`` of float32, as the authors' code takes ``torch.finfo().eps``)
    are left out, so ``B`` acts on the range of ``G`` only; ``s`` is the smallest kept eigenvalue (``"min"``), their
    median (``"median"``, the lower one of an even count, as ``torch.median``) or their mean (``"rmse"``). A zero
    Gramian gives ``B = 0``. Computed in float64; ``B`` does not depend on the gradients' scale.
    """
    return from_host(balance_host(to_host(gramian), scale_mode), gramian)


def balance_host(matrix: np.ndarray, scale_mode: ScaleMode = "min") -> np.ndarray:
    """:func:`balance_transformation` on a float64 host Gramian."""
    values, vectors = eigh(matrix)
    kept = values > values[-1] * matrix.shape[0] * float(np.finfo(np.float32).eps)
    if not kept.any():
        return np.zeros_like(matrix)
    values, vectors = values[kept], vectors[:, kept]  # ascending
    if scale_mode == "min":
        scale = values[0]
    elif scale_mode == "median":
        scale = values[(len(values) - 1) // 2]  # the lower middle one, as torch.median
    else:
        scale = values.mean()
    return (vectors * np.sqrt(scale / values)) @ vectors.T


class AlignedMTL(GramianAggregator):
    r"""Aligned-MTL: make the task gradients orthogonal and of equal size along their principal components.

    Paper: Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR 2023
    (https://arxiv.org/abs/2305.19000), Algorithm 1. With the Gramian ``G = J J^T = V Λ V^T``
    (rank r, eigenvalues ``λ_1 >= ... >= λ_r > 0``), the aligned gradients ``Ĵ = B J`` with

    .. math::

        B = \sqrt{λ_r}\; V Λ^{-1/2} V^\top, \qquad d = Ĵ^\top w = J^\top (B w),

    have a Gramian ``Ĵ Ĵ^T = λ_r V V^T``: orthogonal, all of size ``sqrt(λ_r)`` along the principal directions, so the
    condition number of the system is one. ``w`` are the task weights (``pref_vector``), all ones by default as in the
    authors' code, which sums the aligned gradients; ``scale_mode`` picks ``λ_r`` (``"min"``, the paper's and the
    default), the median or the mean eigenvalue (``"rmse"``, named after the authors' code).

    Differences from torchjd 0.18's ``AlignedMTL``: torchjd averages the aligned gradients (``w = 1/K``) where the
    authors' code sums them, so its update is this one divided by K; and it cuts eigenvalues at ``λ_max K eps`` of the
    input's dtype, where the authors' code (and this one) use float32's ``eps`` also in float64.

    Args:
        target: ``"parameters"`` (default) or ``"representation"`` (the paper's Aligned-MTL-UB).
        pref_vector: K non-negative task weights ``w``; ``None`` for all ones.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.

    Example:
        >>> import torch, mtlzoo
        >>> aligned = mtlzoo.create("aligned_mtl", num_tasks=2)
        >>> aligned.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.ones(2))
        tensor([1., 1.])
    """

    info = StrategyInfo(
        name="aligned_mtl",
        summary="Aligns the task gradients' principal components (condition number one), then sums them.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Dmitry Senushkin", "Nikolay Patakin", "Arseny Kuznetsov", "Anton Konushin"),
            title="Independent Component Alignment for Multi-Task Learning", venue="CVPR", year=2023,
            url="https://arxiv.org/abs/2305.19000"),
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="parameters",
        original_code="https://github.com/SamsungLabs/MTL",
    )
    per_task = ("pref_vector",)

    def __init__(self, num_tasks: int, *, target: Target | None = None,
                 pref_vector: Sequence[float] | Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(num_tasks, target=target)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"Parameter `scale_mode` should be one of {SCALE_MODES}. Found "
                             f"`scale_mode = {scale_mode!r}`.")
        self.pref_vector = preference(pref_vector, num_tasks)
        self.scale_mode = scale_mode

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        balance = balance_host(gramian, self.scale_mode)
        if self.pref_vector is None:
            return balance.sum(1)
        return balance @ self.pref_vector.numpy()[step.tasks]
