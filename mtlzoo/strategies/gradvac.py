r"""Gradient Vaccine (Wang et al., ICLR 2021): steer each pair of gradients towards a moving-average similarity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.strategies._surgery import GramianSurgery, SeededGenerator
from mtlzoo.strategies.pcgrad import task_orders
from mtlzoo.strategy import Paper, StrategyInfo, Target

TARGET_LIMIT = 1 - 1e-6
"""Largest |φ̂| the correction divides by ``sqrt(1 - φ̂^2)`` with: a target of exactly 1 asks for an infinite step."""
SMALL = 12
"""Up to this many tasks the per-pair steps run on Python floats; above it, in numpy for all the rows at once."""


def vaccine_weights(matrix: np.ndarray, targets: np.ndarray, beta: float,
                    orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""GradVac's weights ``c = C^T 1`` on a float64 host Gramian, and the updated targets.

    Row i of ``C`` starts at ``e_i`` and visits ``j = orders[i, t]`` (t = 0, 1, ...), as in
    :class:`GradVac`'s formula; ``P = C G`` (the products ``g_i^{PC} . g_j``) is kept up to date with
    each correction and ``||g_i^{PC}||^2 = (C P^T)_ii`` read afresh at every visit. The rows are
    independent: up to :data:`SMALL` tasks they are done one by one on Python
    floats, above it step t is taken for all of them at once in numpy (the same arithmetic).
    """
    size = matrix.shape[0]
    if size <= SMALL:
        weights, updated = _vaccine_small(matrix.tolist(), targets.tolist(), beta, orders.tolist())
        return np.array(weights), np.array(updated).reshape(size, size)
    rows = np.arange(size)
    norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))
    updated = targets.copy()
    combination = np.eye(size)
    products = matrix.copy()
    for column in orders.T:
        norm = np.sqrt(np.clip(np.einsum("ij,ij->i", combination, products), 0.0, None))
        norm_j = norms[column]
        valid = (column != rows) & (norm > 0) & (norm_j > 0)
        if not valid.any():
            continue
        cosine = np.clip(products[rows, column] / np.where(valid, norm * norm_j, 1.0), -1.0, 1.0)
        target = targets[rows, column]
        hit = valid & (cosine < target)
        if hit.any():
            capped = np.clip(target, -TARGET_LIMIT, TARGET_LIMIT)
            root = np.sqrt(1 - capped**2)
            step = norm * (capped * np.sqrt(1 - cosine**2) - cosine * root) / (np.where(valid, norm_j, 1.0) * root)
            step = np.where(hit, step, 0.0)
            combination[rows, column] += step
            products += step[:, None] * matrix[column]
        updated[rows[valid], column[valid]] = (1 - beta) * target[valid] + beta * cosine[valid]
    return combination.sum(0), updated


def _vaccine_small(matrix: list[list[float]], targets: list[list[float]], beta: float,
                   orders: list[list[int]]) -> tuple[list[float], list[list[float]]]:
    """:func:`vaccine_weights` on Python floats."""
    size = len(matrix)
    norms = [math.sqrt(max(matrix[j][j], 0.0)) for j in range(size)]
    weights = [0.0] * size
    updated = [list(row) for row in targets]
    for i, order in enumerate(orders):
        combination = [0.0] * size
        combination[i] = 1.0
        products = matrix[i]
        for j in order:
            norm_j = norms[j]
            if j == i or norm_j == 0:
                continue
            norm = math.sqrt(max(sum(c * p for c, p in zip(combination, products)), 0.0))
            if norm == 0:
                continue
            cosine = max(-1.0, min(1.0, products[j] / (norm * norm_j)))
            target = targets[i][j]
            if cosine < target:
                capped = max(-TARGET_LIMIT, min(TARGET_LIMIT, target))
                root = math.sqrt(1 - capped**2)
                step = norm * (capped * math.sqrt(1 - cosine**2) - cosine * root) / (norm_j * root)
                combination[j] += step
                products = [p + step * m for p, m in zip(products, matrix[j])]
            updated[i][j] = (1 - beta) * target + beta * cosine
        weights = [w + c for w, c in zip(weights, combination)]
    return weights, updated


class GradVac(GramianSurgery):
    r"""GradVac: raise each pair's cosine similarity to an exponential moving average of its past values.

    Paper: Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models*, ICLR 2021 (https://arxiv.org/abs/2010.05874), Algorithm 1.
    For every task i, with ``g_i^{PC} = g_i`` and the other tasks j in a random order, with
    ``φ_ij = cos(g_i^{PC}, g_j)`` and the target ``φ̂_ij``:

    .. math::

        \text{if } φ_{ij} < \hat φ_{ij}:\quad g_i^{PC} \leftarrow g_i^{PC} +
        \frac{\|g_i^{PC}\| (\hat φ_{ij} \sqrt{1 - φ_{ij}^2} - φ_{ij} \sqrt{1 - \hat φ_{ij}^2})}
             {\|g_j\| \sqrt{1 - \hat φ_{ij}^2}}\, g_j ;
        \qquad \hat φ_{ij} \leftarrow (1 - β) \hat φ_{ij} + β φ_{ij},

    and ``d = sum_i g_i^{PC}``: the correction makes the pair's cosine exactly ``φ̂_ij``. The
    targets start at 0, where GradVac is PCGrad. Computed on the Gramian (a weighting of the
    rows), on the whole gradient (the paper also applies it per layer). A zero gradient takes
    part in no correction and leaves its targets as they are; ``|φ̂|`` is capped at ``1 - 1e-6``
    in the correction's divisor (the formula's step is infinite at 1).

    Running state: the K x K targets ``φ̂`` (a buffer), updated at ``advance()`` from the step's
    first micro-batch (later micro-batches of the step read the same targets); a task absent
    from a step keeps its targets. The task orders come from the strategy's own generator
    (seeded from torch's at construction, or by ``seed``; saved in ``state_dict()``). With two
    tasks the order does not matter and GradVac is deterministic.

    Differences from torchjd 0.18's ``GradVac``: torchjd adds ``eps = 1e-8`` to the divisors
    (an absolute constant, so the result depends on the gradients' scale), updates its targets at
    every call rather than once per optimizer step, and draws the orders from torch's global
    generator; here divisors are exact, with zero gradients and targets of ``|φ̂| = 1`` handled
    as above.

    Args:
        num_tasks: K.
        target: ``"parameters"`` (default, as the paper) or ``"representation"``.
        beta: EMA rate ``β`` of the targets, in [0, 1]; 0.5 as LibMTL and torchjd.
        seed: Seed of the task orders; ``None`` draws one from torch's generator.

    Example:
        >>> import torch, mtlzoo
        >>> gradvac = mtlzoo.create("gradvac", num_tasks=2)
        >>> gradvac.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.ones(2))
        tensor([0.5000, 1.5000])
        >>> gradvac.advance(); gradvac.targets
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]])
    """

    info = StrategyInfo(
        name="gradvac",
        kind="surgery",
        summary="Raises each pair of task gradients to a moving-average cosine similarity, in random order.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Zirui Wang", "Yulia Tsvetkov", "Orhan Firat", "Yuan Cao"),
            title="Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
                  "Multilingual Models",
            venue="ICLR",
            year=2021,
            url="https://arxiv.org/abs/2010.05874",
        ),
        stochastic=True,
        cost="parameters",
        original_code="",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the generator's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, beta: float = 0.5,
                 seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
            raise ValueError(f"Parameter `beta` should be a number in [0, 1]. Found `beta = {beta!r}`.")
        self.beta = float(beta)
        self.random = SeededGenerator(seed)
        self.register_buffer("targets", torch.zeros(num_tasks, num_tasks))
        self._staged: dict[str, Tensor] = {}

    def host_weights(self, matrix: np.ndarray, eps: float, losses: Tensor, tasks: Tensor,
                     micro_batch: int) -> np.ndarray:
        index = tasks.cpu().numpy()
        targets = self.targets.detach().cpu().numpy().astype(np.float64)[np.ix_(index, index)]
        weights, updated = vaccine_weights(matrix, targets, self.beta,
                                           task_orders(matrix.shape[0], self.random.begin()))
        if micro_batch == 0:
            staged = self.targets.detach().cpu().numpy().copy()
            staged[np.ix_(index, index)] = updated  # rounded to the buffer's dtype
            self._staged["targets"] = torch.from_numpy(staged).to(self.targets.device)
        return weights

    def _commit(self) -> None:
        for name, value in self._staged.items():
            setattr(self, name, value)
        self._staged = {}
        self.random.commit()

    def _drop_staged(self) -> None:
        self._staged = {}
        self.random.rewind()

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.random.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load(state["generator"])
        self._staged = {}
