r"""Gradient Vaccine (Wang et al., ICLR 2021): steer each pair of gradients towards a moving-average similarity."""

from __future__ import annotations

import numpy as np
import torch

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.strategies._weighting import check_rate
from mtlzoo.strategies.pcgrad import drawing, initial_stream, task_orders
from mtlzoo.strategy import Paper, StrategyInfo, Target

TARGET_LIMIT = 1 - 1e-6
"""Largest |φ̂| the correction divides by ``sqrt(1 - φ̂^2)`` with: a target of exactly 1 asks for an infinite step."""


def vaccine_weights(matrix: np.ndarray, targets: np.ndarray, beta: float,
                    orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""GradVac's weights ``c = C^T 1`` on a float64 host Gramian, and the updated targets.

    Row i of ``C`` starts at ``e_i`` and visits ``j = orders[i, t]``, as in :class:`GradVac`'s formula; ``P = C G`` is
    kept up to date and ``||g_i^{PC}||^2 = (C P^T)_ii`` read at every visit; step t is taken for all rows at once.
    """
    size = matrix.shape[0]
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


class GradVac(GramianAggregator):
    r"""GradVac: raise each pair's cosine similarity to an exponential moving average of its past values.

    Paper: Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual
    Models*, ICLR 2021 (https://arxiv.org/abs/2010.05874), Algorithm 1. For every task i, with ``g_i^{PC} = g_i`` and
    the other tasks j in a random order, with ``φ_ij = cos(g_i^{PC}, g_j)`` and the target ``φ̂_ij``:

    .. math::

        \text{if } φ_{ij} < \hat φ_{ij}:\quad g_i^{PC} \leftarrow g_i^{PC} +
        \frac{\|g_i^{PC}\| (\hat φ_{ij} \sqrt{1 - φ_{ij}^2} - φ_{ij} \sqrt{1 - \hat φ_{ij}^2})}
             {\|g_j\| \sqrt{1 - \hat φ_{ij}^2}}\, g_j ;
        \qquad \hat φ_{ij} \leftarrow (1 - β) \hat φ_{ij} + β φ_{ij},

    and ``d = sum_i g_i^{PC}``: the correction makes the pair's cosine exactly ``φ̂_ij``. The
    targets start at 0, where GradVac is PCGrad. Computed on the Gramian, on the whole gradient
    (the paper also applies it per layer). A zero gradient takes part in no correction and keeps
    its targets; ``|φ̂|`` is capped at ``1 - 1e-6`` in the divisor (the step is infinite at 1).

    Running state: the K x K targets ``φ̂``, updated at ``advance()`` from the step's first
    micro-batch; a task absent from a step keeps its targets. The task orders come from the
    strategy's own generator (seeded from torch's, or by ``seed``; saved in ``state_dict()``).

    Differences from torchjd 0.18's ``GradVac``: torchjd adds ``eps = 1e-8`` to the divisors (an absolute constant, so
    the result depends on the gradients' scale), updates its targets at every call rather than once per optimizer step,
    and draws the orders from torch's global generator.

    Args:
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
        summary="Raises each pair of task gradients to a moving-average cosine similarity, in random order.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Zirui Wang", "Yulia Tsvetkov", "Orhan Firat", "Yuan Cao"),
            title="Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively "
                  "Multilingual Models",
            venue="ICLR", year=2021, url="https://arxiv.org/abs/2010.05874"),
        stochastic=True, cost="parameters", original_code="",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the generator's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, beta: float = 0.5,
                 seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.beta = check_rate(beta, "beta", at_most=1.0)
        self.declare_state(targets=torch.zeros(num_tasks, num_tasks))
        self.declare_state(per_step="every", generator=initial_stream(seed))

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        index = np.ix_(step.tasks, step.tasks)
        # Every micro-batch of a step corrects towards the targets the step started with (the committed ones).
        everyone = self.state.committed("targets").detach().cpu().numpy().astype(np.float64)
        with drawing(self.state) as generator:
            orders = task_orders(gramian.shape[0], generator)
        weights, updated = vaccine_weights(gramian, everyone[index], self.beta, orders)
        everyone[index] = updated
        self.state.targets = torch.from_numpy(everyone)  # rounded to the buffer's dtype when committed
        return weights
