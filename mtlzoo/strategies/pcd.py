r"""PCD (Varam & AlHajri, TMLR 2026): follow task 1's gradient, every other task guaranteed a share of progress."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.strategies._weighting import check_rate
from mtlzoo.strategy import Paper, StrategyInfo, Target

_INFEASIBLE = ("PCD: the secondary tasks' constraints cannot all hold (their gradients pull against each other: a "
               "non-negative combination of them is zero); they are dropped for this step and the update is the "
               "primary task's gradient, as the authors' Algorithm 1.")


def priority_weights(gramian: np.ndarray, taus: np.ndarray) -> np.ndarray | None:
    r"""``w = (1, μ)`` with ``d = sum_i w_i g_i`` the solution of PCD's quadratic program, or ``None`` if infeasible.

    .. math::

        \min_d \tfrac12 \|d - g_1\|^2 \ \text{ s.t. }\ g_j \cdot d \ge τ_j \|g_j\|^2 \quad (j \ge 2),

    on the Gramian of ``g_1, ..., g_K`` (primary first), by Goldfarb and Idnani's dual method ("A numerically stable
    dual method for solving strictly convex quadratic programs", Math. Programming 1983) with the identity as the primal
    Hessian: from ``d = g_1``, the most violated constraint joins the active set, its multiplier growing along the part
    of its gradient orthogonal to the active ones (``d = g_1 + sum_j μ_j g_j`` throughout, so every product is read from
    the Gramian); an active multiplier that would turn negative leaves the set first. A constraint counts as met within
    ``1e-9`` of the largest ``||g_i||^2``; a gradient whose part orthogonal to the active ones is below ``1e-9`` of its
    squared norm counts as dependent on them. Infeasible when a violated constraint's gradient depends on the active
    ones and no multiplier can give way.
    """
    secondary = gramian[1:, 1:]
    bounds = taus * np.diag(secondary) - gramian[1:, 0]  # constraint j holds when (G_s μ)_j >= bounds_j
    mu = np.zeros(secondary.shape[0])
    active: list[int] = []
    tolerance = 1e-9 * max(float(np.diag(gramian).max()), np.finfo(np.float64).tiny)
    for _ in range(10 * gramian.shape[0] + 10):
        slack = secondary @ mu - bounds
        slack[active] = 0.0
        if not slack.size or float(slack.min()) >= -tolerance:
            return np.concatenate([[1.0], mu])
        joining = int(slack.argmin())
        violation = float(slack[joining])
        for _ in range(len(active) + 1):
            ratios, direction, orthogonal = np.full(0, np.inf), np.zeros(0), float(secondary[joining, joining])
            if active:
                direction = np.linalg.solve(secondary[np.ix_(active, active)], secondary[active, joining])
                orthogonal -= float(secondary[joining, active] @ direction)
                ratios = np.where(direction > 0, mu[active] / np.where(direction > 0, direction, 1.0), np.inf)
            full = -violation / orthogonal if orthogonal > 1e-9 * secondary[joining, joining] else np.inf
            partial = float(ratios.min(initial=np.inf))
            step = min(full, partial)
            if step == np.inf:
                return None
            mu[active] -= step * direction
            mu[joining] += step
            if full <= partial:
                active.append(joining)
                break
            leaving = active.pop(int(ratios.argmin()))
            mu[leaving] = 0.0
            violation = float(secondary[joining] @ mu - bounds[joining])
    warnings.warn("PCD: the dual active-set method did not converge (rounding); its last iterate is used.",
                  SolverWarning, stacklevel=6)
    return np.concatenate([[1.0], np.clip(mu, 0.0, None)])


class PCD(GramianAggregator):
    r"""PCD: the update nearest the first task's gradient that gives every other task a share of its own progress.

    Paper: Varam & AlHajri, *Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization*, TMLR 2026 (https://openreview.net/forum?id=HT01yGHLEt),
    Algorithm 1. Task 1 (index 0) is the primary objective, the others secondary. With
    ``g̃_i = s_i g_i`` the gradients normalised by a running estimate of their size,

    .. math::

        \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \ \text{ s.t. }\
        \tilde g_j \cdot d \ge τ_j \|\tilde g_j\|^2 \ (j \ge 2), \qquad
        d = \tilde d\, \frac{\|g_1\|}{\|\tilde d\|},

    ``s_i = 1 / sqrt(v̂_i + eps)``, ``v̂_i`` the bias-corrected moving average (decay ``β``) of ``||g_i||^2`` over the
    optimizer steps (the paper's Def. 4.5, Adam's second moment per task). Each secondary task gets at least a fraction
    ``τ`` of the first-order progress a step along its own normalised gradient would give; within that, the update
    follows the primary gradient. The quadratic program is solved exactly on the Gramian (:func:`priority_weights`,
    Goldfarb and Idnani's dual method, as torchjd 0.18's ``PCD``; the authors' ``pcd/qp.py`` enumerates the working
    sets, exponential in K, with the same minimiser); a weighting of the rows.

    As the authors' code: a zero primary gradient gives the update 0; constraints that cannot all
    hold (a non-negative combination of the secondaries is zero, which needs K >= 3) are dropped
    for the step and the update is ``g_1`` (here with a :class:`~mtlzoo.errors.SolverWarning`);
    ``d̃ = 0`` (to the rounding of ``J^T c``) gives 0; the moving average is updated at every step.

    Beyond the paper, which has every objective at every step: a task absent from a step keeps its moving average and
    its step count (the bias correction counts each task's own steps); when task 1 is absent, the first present task
    leads. The moving average is updated once per optimizer step, from the step's first micro-batch (each micro-batch
    normalises by the average the step started with and its own norms). The authors' PCD acts on the list of parameters
    given to it as one vector; here it acts on the shared part, and every head learns from its own loss (as torchjd's
    ``mtl_backward``).

    Running state: the moving averages ``second_moments`` and the per-task step counts ``counts``.

    Args:
        tau: ``τ`` in [0, 1]: one number for every secondary task, or K - 1 numbers (tasks 2 to K);
            0.02 as the authors' default.
        beta: Decay ``β`` in [0, 1) of the moving average of the squared norms; 0.999 as the authors'.
        eps: ``eps >= 0`` added to ``v̂`` (an absolute constant, as the authors'); 1e-8.

    Example:
        >>> import torch, mtlzoo
        >>> pcd = mtlzoo.create("pcd", num_tasks=2, tau=0.5)
        >>> pcd.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.ones(2))
        tensor([0.1691, 0.9856])
    """

    info = StrategyInfo(
        name="pcd", summary="Follows task 1's gradient, each other task guaranteed a fraction tau of its own progress.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Dara Varam", "Mohamed I. AlHajri"),
            title="Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical "
                  "Multi-Objective Optimization",
            venue="TMLR", year=2026, url="https://openreview.net/forum?id=HT01yGHLEt",
        ),
        properties=frozenset(), cost="parameters",
        original_code="https://github.com/DaraVaram/priority-constrained-descent",
    )
    """No claim: task 1 leads, so PCD is not permutation invariant, and the normalisation's ``eps`` (absolute) makes
    it depend on the gradients' scale."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, tau: float | Sequence[float] | Tensor = 0.02,
                 beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(num_tasks, target=target)
        message = (f"Parameter `tau` should be a number in [0, 1] or {num_tasks - 1} numbers in [0, 1] (one per "
                   f"secondary task). Found `tau = {tau!r}`.")
        try:
            taus = torch.as_tensor(tau, dtype=torch.float64).detach().clone()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(message) from error
        if isinstance(tau, (bool, str)) or taus.dim() > 1 or (taus.dim() == 1 and taus.shape[0] != num_tasks - 1) \
                or not bool(((taus >= 0) & (taus <= 1)).all()):
            raise ValueError(message)
        self.taus = torch.cat([torch.zeros(1, dtype=torch.float64), taus.expand(num_tasks - 1)])  # task k's τ at k
        self.beta = check_rate(beta, "beta", below=1.0)
        self.eps = check_rate(eps, "eps")
        self.declare_state(second_moments=torch.zeros(num_tasks, dtype=torch.float64),
                           counts=torch.zeros(num_tasks, dtype=torch.int64))

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        squares = np.clip(np.diag(gramian), 0.0, None)
        moments = self.state.committed("second_moments").detach().cpu().numpy()[step.tasks]
        moments = self.beta * moments + (1 - self.beta) * squares
        counts = self.state.committed("counts").detach().cpu().numpy()[step.tasks] + 1
        self.state.write_rows("second_moments", step.tasks, moments)  # the step's first micro-batch's
        self.state.write_rows("counts", step.tasks, counts)
        debiased = moments / (1 - self.beta ** counts.astype(np.float64))
        denominators = np.sqrt(debiased + self.eps)
        scales = np.where(denominators > 0, 1.0 / np.where(denominators > 0, denominators, 1.0), 0.0)
        size = gramian.shape[0]
        if not squares[0] > 0:
            return np.zeros(size)
        weights = priority_weights(gramian * np.outer(scales, scales), self.taus.numpy()[step.tasks[1:]])
        if weights is None:
            warnings.warn(_INFEASIBLE, SolverWarning, stacklevel=5)
            weights = np.eye(size)[0]
        coefficients = weights * scales
        squared = float(coefficients @ gramian @ coefficients)  # ||d~||^2
        reach = float(np.abs(coefficients) @ np.sqrt(squares))  # bounds ||d~|| and its rounding
        if squared <= size * step.eps * reach**2:
            return np.zeros(size)
        return coefficients * math.sqrt(squares[0] / squared)
