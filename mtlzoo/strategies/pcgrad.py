r"""PCGrad (Yu et al., NeurIPS 2020): project away the conflicting part of each gradient, in random order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.state import RunningState
from mtlzoo.strategy import Paper, StrategyInfo, Target


def initial_stream(seed: int | None) -> bytes:
    """The initial state of a stochastic aggregator's random stream (a CPU ``torch.Generator``'s, as bytes), seeded
    by ``seed`` or from torch's global generator. Declared as the field ``generator`` (``per_step="every"``), it is
    staged, committed, rewound and saved like any running state: a resumed run draws what the uninterrupted would.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed).get_state().numpy().tobytes()


@contextmanager
def drawing(state: RunningState) -> Iterator[torch.Generator]:
    """A CPU generator at the stream's current state (``state.generator``); what is drawn from it is staged."""
    generator = torch.Generator()
    generator.set_state(torch.frombuffer(bytearray(state.generator), dtype=torch.uint8))
    yield generator
    state.generator = generator.get_state().numpy().tobytes()


def task_orders(size: int, generator: torch.Generator) -> np.ndarray:
    """Row i: the order in which task i visits the tasks, ``torch.randperm(size)`` drawn for i = 0, 1, ... in turn."""
    return np.array([torch.randperm(size, generator=generator).numpy() for _ in range(size)],
                    dtype=np.intp).reshape(size, size)


def projected_weights(matrix: np.ndarray, orders: np.ndarray) -> np.ndarray:
    r"""PCGrad's weights ``c = C^T 1`` on a float64 host Gramian, with ``g_i^{PC} = sum_k C_ik g_k``.

    Row i of ``C`` starts at ``e_i`` and visits the tasks ``j = orders[i, t]``: if ``g_i^{PC} . g_j < 0`` (and
    ``j != i``, ``g_j != 0``), ``C_ij -= g_i^{PC} . g_j / ||g_j||^2``, with ``P = C G`` kept up to date; step t is
    taken for all rows at once.
    """
    size = matrix.shape[0]
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


class PCGrad(GramianAggregator):
    r"""PCGrad: each task's gradient loses its component along every other gradient it conflicts with.

    Paper: Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020 (https://arxiv.org/abs/2001.06782),
    Algorithm 1. For every task i, with ``g_i^{PC} = g_i`` and the other tasks j visited in a random order:

    .. math::

        \text{if } g_i^{PC} \cdot g_j < 0:\quad
        g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j,
        \qquad d = \sum_i g_i^{PC}

    (projections against the original ``g_j``, as the authors' code). Task i skips itself, as the paper's Algorithm 1
    ("for each g_j, j != i"): the authors' code (``pc_grad_update``) and its ports (LibMTL, torchjd's ``PCGrad``) visit
    ``j = i`` too, which matters only once earlier projections have turned ``g_i^{PC}`` against ``g_i`` (that visit
    removes the component along ``g_i``). Without any conflict ``d`` is the plain sum. Computed on the Gramian
    (``g_i^{PC} = sum_k C_ik g_k``): the update is ``J^T C^T 1``. A zero gradient projects nothing. The orders come from
    the strategy's own generator (seeded from torch's, or by ``seed``; saved in ``state_dict()``); the update's
    expectation over them is permutation invariant, and for a fixed draw it scales with the gradients.

    Args:
        seed: Seed of the task orders; ``None`` draws one from torch's generator.

    Example:
        >>> import torch, mtlzoo
        >>> pcgrad = mtlzoo.create("pcgrad", num_tasks=2)
        >>> pcgrad.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.ones(2))
        tensor([0.5000, 1.5000])
    """

    info = StrategyInfo(
        name="pcgrad",
        summary="Projects each task gradient off the gradients it conflicts with, in random order, then sums.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Tianhe Yu", "Saurabh Kumar", "Abhishek Gupta", "Sergey Levine", "Karol Hausman", "Chelsea Finn"),
            title="Gradient Surgery for Multi-Task Learning", venue="NeurIPS", year=2020,
            url="https://arxiv.org/abs/2001.06782"),
        stochastic=True, cost="parameters", original_code="https://github.com/tianheyu927/PCGrad",
    )
    unchecked_settings = ("seed",)
    """A checkpoint carries the generator's state, which replaces the one ``seed`` started."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, seed: int | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.declare_state(per_step="every", generator=initial_stream(seed))

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        with drawing(self.state) as generator:
            orders = task_orders(gramian.shape[0], generator)
        return projected_weights(gramian, orders)
