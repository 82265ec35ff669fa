r"""PCGrad (Yu et al., NeurIPS 2020): project away the conflicting part of each gradient, in random order."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.strategies._surgery import GramianSurgery, SeededGenerator
from mtlzoo.strategy import Paper, StrategyInfo, Target

SMALL = 24
"""Up to this many tasks the per-pair steps run on Python floats (numpy's per-call overhead dominates there);
above it, step t runs for all the rows at once in numpy."""


def task_orders(size: int, generator: torch.Generator) -> np.ndarray:
    """Row i: the order in which task i visits the tasks, ``torch.randperm(size)`` drawn for i = 0, 1, ... in turn."""
    return np.array([torch.randperm(size, generator=generator).numpy() for _ in range(size)],
                    dtype=np.intp).reshape(size, size)


def projected_weights(matrix: np.ndarray, orders: np.ndarray) -> np.ndarray:
    r"""PCGrad's weights ``c = C^T 1`` on a float64 host Gramian, with ``g_i^{PC} = sum_k C_ik g_k``.

    Row i of ``C`` starts at ``e_i`` and visits the tasks ``j = orders[i, t]`` (t = 0, 1, ...): if
    ``g_i^{PC} . g_j < 0`` (and ``j != i``, ``g_j != 0``), ``C_ij -= g_i^{PC} . g_j / ||g_j||^2``. The
    products ``P = C G`` (``P_ij = g_i^{PC} . g_j``) are kept up to date with each step. The rows are
    independent: up to :data:`SMALL` tasks they are done one by one on Python floats, above it step t
    is taken for all of them at once in numpy (the same arithmetic, row by row).
    """
    size = matrix.shape[0]
    if size <= SMALL:
        return np.array(_projected_small(matrix.tolist(), orders.tolist()))
    rows = np.arange(size)
    diagonal = np.diag(matrix)
    combination = np.eye(size)
    products = matrix.copy()
    for column in orders.T:
        product = products[rows, column]
        divisor = diagonal[column]
        hit = (column != rows) & (divisor > 0) & (product < 0)
        if hit.any():
            step = np.where(hit, -product / np.where(hit, divisor, 1.0), 0.0)
            combination[rows, column] += step
            products += step[:, None] * matrix[column]
    return combination.sum(0)


def _projected_small(matrix: list[list[float]], orders: list[list[int]]) -> list[float]:
    """:func:`projected_weights` on Python floats."""
    size = len(matrix)
    weights = [0.0] * size
    for i, order in enumerate(orders):
        weights[i] += 1.0
        products = matrix[i]
        for j in order:
            product, divisor = products[j], matrix[j][j]
            if j != i and divisor > 0 and product < 0:
                step = -product / divisor
                weights[j] += step
                products = [p + step * m for p, m in zip(products, matrix[j])]
    return weights


class PCGrad(GramianSurgery):
    r"""PCGrad: each task's gradient loses its component along every other gradient it conflicts with.

    Paper: Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020
    (https://arxiv.org/abs/2001.06782), Algorithm 1. For every task i, with
    ``g_i^{PC} = g_i`` and the other tasks j visited in a random order:

    .. math::

        \text{if } g_i^{PC} \cdot g_j < 0:\quad
        g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j,
        \qquad d = \sum_i g_i^{PC}

    (projections against the original ``g_j``, as the authors' code). Tasks that conflict with
    no other are left as they are, so without any conflict ``d`` is the plain sum. Computed on
    the Gramian (``g_i^{PC} = sum_k C_ik g_k``), so the update is a weighting ``J^T C^T 1``. A
    zero gradient projects nothing.

    The orders are drawn from the strategy's own generator, seeded from torch's global one at
    construction (or by ``seed``) and saved in ``state_dict()``: a run is deterministic given
    ``torch.manual_seed`` and resumes exactly. The update's expectation over the orders is
    permutation invariant, and for a fixed draw it scales with the gradients.

    Args:
        num_tasks: K.
        target: ``"parameters"`` (default, as the paper) or ``"representation"``.
        seed: Seed of the task orders; ``None`` draws one from torch's generator.

    Example:
        >>> import torch, mtlzoo
        >>> pcgrad = mtlzoo.create("pcgrad", num_tasks=2)
        >>> pcgrad.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.ones(2))
        tensor([0.5000, 1.5000])
    """

    info = StrategyInfo(
        name="pcgrad",
        kind="surgery",
        summary="Projects each task gradient off the gradients it conflicts with, in random order, then sums.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Tianhe Yu", "Saurabh Kumar", "Abhishek Gupta", "Sergey Levine", "Karol Hausman",
                     "Chelsea Finn"),
            title="Gradient Surgery for Multi-Task Learning",
            venue="NeurIPS",
            year=2020,
            url="https://arxiv.org/abs/2001.06782",
        ),
        stochastic=True,
        cost="parameters",
        original_code="https://github.com/tianheyu927/PCGrad",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the generator's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.random = SeededGenerator(seed)

    def host_weights(self, matrix: np.ndarray, eps: float, losses: Tensor, tasks: Tensor,
                     micro_batch: int) -> np.ndarray:
        return projected_weights(matrix, task_orders(matrix.shape[0], self.random.begin()))

    def _commit(self) -> None:
        self.random.commit()

    def _drop_staged(self) -> None:
        self.random.rewind()

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.random.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load(state["generator"])
