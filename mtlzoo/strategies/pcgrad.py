r"""PCGrad (Yu et al., NeurIPS 2020): project away the conflicting part of each gradient, in random order."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.strategies._surgery import GramianSurgery, SeededGenerator
from mtlzoo.strategy import Paper, StrategyInfo, Target


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

    def weights_for(self, gramian: Tensor, losses: Tensor, tasks: Tensor, micro_batch: int) -> Tensor:
        generator = self.random.begin()
        matrix = gramian.detach().to("cpu", torch.float64)
        size = matrix.shape[0]
        weights = torch.zeros(size, dtype=torch.float64)
        for i in range(size):
            combination = torch.zeros(size, dtype=torch.float64)
            combination[i] = 1.0
            for j in torch.randperm(size, generator=generator).tolist():
                if j == i or matrix[j, j] <= 0:
                    continue
                product = combination @ matrix[:, j]
                if product < 0:
                    combination[j] -= product / matrix[j, j]
            weights += combination
        return weights.to(gramian.dtype).to(gramian.device)

    def _commit(self) -> None:
        self.random.commit()

    def _drop_staged(self) -> None:
        self.random.rewind()

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.random.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.random.load(state["generator"])
