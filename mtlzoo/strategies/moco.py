r"""MoCo (Fernando et al., ICLR 2023): MGDA's weights stepped on tracked task gradients, which correct its bias."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.solvers import from_host, project_to_simplex, to_host
from mtlzoo.strategies._projected import ProjectedWeights
from mtlzoo.strategies._weighting import ShapedAtFirstStep, check_rate
from mtlzoo.strategy import Paper, StrategyInfo, Target


class MoCo(ShapedAtFirstStep, ProjectedWeights):
    r"""MoCo: stochastic MGDA on tracked task gradients, whose running average corrects the bias of one batch's.

    Paper: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, *Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach*, ICLR 2023 (https://openreview.net/forum?id=dLAYGdKTi2),
    Algorithm 1 (multi-objective gradient correction). With ``J`` the task gradients (K x n) of the step,
    ``Y`` the tracked gradients (0 at first) and ``λ`` the weights (``1/K`` each at first):

    .. math::

        Y_{t+1} = Y_t - β\,(Y_t - J), \qquad
        λ_{t+1} = Π_Δ\big(λ_t - γ\,(Y_{t+1} Y_{t+1}^\top + ρ I)\,λ_t\big), \qquad
        d = Y_{t+1}^\top λ_{t+1},

    ``Π_Δ`` the Euclidean projection onto the simplex. MGDA's weights from one batch's gradients are a
    biased estimate of the full gradients' (the minimum-norm point is not linear in them); tracking
    the gradients across steps removes that bias without larger batches. ``Y_0 = 0`` as in the authors'
    code, so the first updates are short (``Y_1 = β J``): the bias MoCo corrects is that of MGDA's weights.

    As the authors' code (``Trade-Off-MOL``, ``LibMTL/weighting/MoCo.py`` by the first author; its defaults
    ``β = γ = ρ = 0.1`` and no gradient normalisation): constant step sizes (the analysis takes decaying
    ones), no factor K (their earlier NYUv2 script multiplies by K). LibMTL's ``MoCo``, "based on the
    author's sharing code", departs from it in three places: it tracks ``L_k g_k / ||g_k||`` instead of
    ``g_k``, decays ``β`` and ``γ`` as ``1 / t^{1/2}``, and replaces the projection by a softmax.

    The paper defines MoCo on the shared parameters, and so does this class: ``Y`` is carried from step to
    step, and the rows of ``dL/dz`` of one batch (``target="representation"``) belong to its own samples.

    Running state: ``weights`` (``λ``) and ``tracked`` (``Y``, K x n, shaped and typed at the first step:
    n floats per task, the size of the Jacobian), from the step's first micro-batch; a task absent from a
    step keeps its row and weight.

    Args:
        target: ``"parameters"`` (the only one).
        beta: Tracking rate ``β`` in (0, 1] (1: no tracking, stochastic MGDA's projected step).
        gamma: Step size ``γ`` of the weights.
        rho: Regularisation ``ρ`` of the weights' step.

    Example:
        >>> import torch, mtlzoo
        >>> moco = mtlzoo.create("moco", num_tasks=2, beta=0.5)
        >>> moco.aggregate(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.ones(2))
        tensor([0.4812, 0.2594])
    """

    info = StrategyInfo(
        name="moco",
        summary="Stochastic MGDA on tracked task gradients (a running average that corrects one batch's bias).",
        request=Request("parameters", "gradients"),
        paper=Paper(
            authors=("Heshan Fernando", "Han Shen", "Miao Liu", "Subhajit Chaudhury", "Keerthiram Murugesan",
                     "Tianyi Chen"),
            title="Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach", venue="ICLR",
            year=2023, url="https://openreview.net/forum?id=dLAYGdKTi2",
        ),
        properties=frozenset({"permutation_invariant"}), cost="parameters",
        original_code="https://github.com/heshandevaka/Trade-Off-MOL",
    )
    supported_targets: ClassVar[tuple[Target, ...]] = ("parameters",)
    shaped_later = ("tracked",)

    def __init__(self, num_tasks: int, *, target: Target | None = None, beta: float = 0.1, gamma: float = 0.1,
                 rho: float = 0.1) -> None:
        super().__init__(num_tasks, target=target)
        self.beta = check_rate(beta, "beta", positive=True, at_most=1.0)
        self.gamma = check_rate(gamma, "gamma", positive=True)
        self.rho = check_rate(rho, "rho")
        self.declare_state(tracked=torch.zeros(0))

    def update_from(self, jacobians: list[Tensor], tasks: np.ndarray, inputs: StepInputs) -> Update:
        (jacobian,) = jacobians
        if self.tracked.shape != (self.num_tasks, jacobian.shape[1]):  # Y_0 = 0, shaped at the first step
            self.tracked = jacobian.new_zeros(self.num_tasks, jacobian.shape[1])
        tracked = self.state.committed("tracked").to(jacobian)[torch.from_numpy(tasks).to(jacobian.device)]
        rows = tracked - self.beta * (tracked - jacobian)
        self.state.write_rows("tracked", tasks, rows)
        weights = self.previous(tasks)
        product = to_host(rows @ rows.T)
        weights = project_to_simplex(weights - self.gamma * (product @ weights + self.rho * weights))
        self.keep(weights, tasks)
        return Update(direction=(from_host(weights, rows) @ rows).view_as(inputs.gradients[0]))
