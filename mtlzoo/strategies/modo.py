r"""MoDo (Chen et al., JMLR 2024): task weights moved by the product of two independent batches' gradients."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.solvers import from_host, project_to_simplex, to_host
from mtlzoo.strategies._projected import ProjectedWeights
from mtlzoo.strategies._weighting import check_rate
from mtlzoo.strategy import Paper, StrategyInfo, Target


class MoDo(ProjectedWeights):
    r"""MoDo: one projected step of the task weights per step, on a product of independent gradients.

    Paper: Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance*, JMLR 2024 (https://www.jmlr.org/papers/v25/23-1287.html),
    multi-objective gradient with double sampling. With ``J_1``, ``J_2`` the task gradients (K x n) of two
    independent batches of the step and ``λ`` the running weights (``1/K`` each at first):

    .. math::

        λ_{t+1} = Π_Δ\big(λ_t - γ\,(J_1 J_2^\top λ_t + ρ\,λ_t)\big), \qquad
        d = \tfrac12\,(J_1 + J_2)^\top λ_{t+1},

    ``Π_Δ`` the Euclidean projection onto the simplex. ``J_1 J_2^T λ`` estimates the gradient of
    ``||J^T λ||^2 / 2`` without the bias of one batch's ``J_1 J_1^T`` (double sampling). The first batch
    is the one ``mtl.backward(losses, more_batches=[second])`` gives as ``losses``; the heads learn from
    it alone (the wrapper's rule), the shared part from both.

    The authors' code (``Trade-Off-MOL``, ``LibMTL/weighting/MoDo.py``) takes the same two batches and steps the shared
    part and the heads with the sum of both batches' gradients, leaving the ``1/2`` to the learning rate; here the
    shared part gets the paper's mean, so that it keeps the scale of the heads, which learn from one batch. LibMTL's
    ``MoDo`` reads a third batch for ``d``; torchjd 0.18's ``MoDoWeighting`` is ``λ_{t+1}`` itself (same ``γ``, ``ρ``).

    The paper defines MoDo on the shared parameters. On ``target="representation"`` it reads one batch (products across
    batches of ``dL/dz`` pair unrelated samples): ``J_2 = J_1``, the biased estimate double sampling avoids. Given one
    batch on the parameters, it reuses it with a :class:`~mtlzoo.errors.ReusedBatchWarning`.

    Args:
        target: ``"parameters"`` (default, the paper's) or ``"representation"`` (one batch).
        gamma: Step size ``γ`` of the weights (0.1, as the authors' code and torchjd).
        rho: Regularisation ``ρ`` of the weights' step (0.1, as theirs).

    Example:
        >>> import torch, mtlzoo
        >>> modo = mtlzoo.create("modo", num_tasks=2)
        >>> first, second = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
        >>> modo.aggregate(first, torch.ones(2), more_batches=[second])
        tensor([0.6000, 0.7250])
    """

    info = StrategyInfo(
        name="modo",
        summary="Task weights stepped on the product of two independent batches' gradients (double sampling).",
        request=Request("parameters", "gradients", batches=2),
        paper=Paper(
            authors=("Lisha Chen", "Heshan Fernando", "Yiming Ying", "Tianyi Chen"),
            title="Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and "
                  "Conflict-Avoidance",
            venue="JMLR", year=2024, url="https://www.jmlr.org/papers/v25/23-1287.html",
        ),
        properties=frozenset({"permutation_invariant"}), cost="parameters",
        original_code="https://github.com/heshandevaka/Trade-Off-MOL",
    )
    batches = 2

    def __init__(self, num_tasks: int, *, target: Target | None = None, gamma: float = 0.1,
                 rho: float = 0.1) -> None:
        super().__init__(num_tasks, target=target)
        self.gamma = check_rate(gamma, "gamma", positive=True)
        self.rho = check_rate(rho, "rho")

    def update_from(self, jacobians: list[Tensor], tasks: np.ndarray, inputs: StepInputs) -> Update:
        first, second = jacobians[0], jacobians[-1]
        weights = self.previous(tasks)
        product = to_host(first @ second.T)
        weights = project_to_simplex(weights - self.gamma * (product @ weights + self.rho * weights))
        self.keep(weights, tasks)
        coefficients = from_host(weights, first)
        direction = sum(coefficients @ jacobian for jacobian in jacobians) / len(jacobians)
        assert inputs.gradients is not None
        return Update(direction=direction.view_as(inputs.gradients[0]))
