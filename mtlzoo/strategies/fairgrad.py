r"""FairGrad (Ban & Ji, ICML 2024): alpha-fair resource allocation among the tasks' improvements."""

from __future__ import annotations

import math

import numpy as np

from mtlzoo.protocol import Request
from mtlzoo.roles import ClipNorm, GramianAggregator, HostStep
from mtlzoo.strategies.nash_mtl import nonzero_rows, pareto_stationary, warn_not_converged
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_int

FAIRGRAD_PAPER = Paper(
    authors=("Hao Ban", "Kaiyi Ji"), title="Fair Resource Allocation in Multi-Task Learning", venue="ICML", year=2024,
    url="https://arxiv.org/abs/2402.15638",
)


def fair_weights(gramian: np.ndarray, alpha: float, max_iterations: int = 200) -> tuple[np.ndarray, bool]:
    r"""The positive solution of ``G w = w^{-1/α}`` (element-wise), and whether Newton's method converged.

    It is the minimiser of the strictly convex ``f(w) = w^T G w / 2 + sum_k φ(w_k)`` with ``φ'(w) = -w^{-1/α}`` (``φ =
    -log`` at ``α = 1``, Nash-MTL's problem), by Newton steps kept positive, from the best point on the ray of the
    uniform weights: backtracking until ``f`` decreases while the Newton decrement is above 1e-10, full steps below,
    until a step changes no weight by more than 1e-13 of itself. It exists when no convex combination of the rows is
    zero (checked by the caller). ``G`` should be of unit scale; the caller scales the solution back.
    """
    size = gramian.shape[0]
    power = 1.0 - 1.0 / alpha

    def value(w: np.ndarray) -> float:
        barrier = -np.log(w).sum() if alpha == 1 else -(w**power).sum() / power
        return 0.5 * float(w @ gramian @ w) + float(barrier)

    curvature = float(gramian.sum())
    w = np.full(size, (size / curvature) ** (alpha / (alpha + 1)) if curvature > 0 else 1.0)
    current = value(w)
    for _ in range(max_iterations):
        gradient = gramian @ w - w ** (-1.0 / alpha)
        hessian = gramian.copy()
        hessian.flat[::size + 1] += w ** (-1.0 / alpha - 1.0) / alpha
        step = np.linalg.solve(hessian, -gradient)
        if float(np.max(np.abs(step) / w)) <= 1e-13:
            return w, True
        shrinking = step < 0
        length = min(1.0, 0.99 * float(np.min(-w[shrinking] / step[shrinking]))) if shrinking.any() else 1.0
        decrement = float(-gradient @ step)
        while decrement > 1e-10:  # far from the minimiser: backtrack until f decreases enough
            candidate = w + length * step
            if value(candidate) <= current - 0.25 * length * decrement:
                break
            length /= 2
            if length < 1e-12:
                return w, False
        w = w + length * step
        current = value(w)
    return w, False


class FairWeights(GramianAggregator):
    r"""FairGrad's weights, unclipped: ``K w`` with ``G w = w^{-1/α}`` (the core of :class:`FairGrad`).

    Paper: Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024
    (https://arxiv.org/abs/2402.15638), eq. 4 and Algorithm 1.

    Args:
        alpha: ``α > 0``, the fairness (see :class:`FairGrad`).
        max_iterations: Newton steps before giving up (with a warning).
    """

    info = StrategyInfo(
        name="fair_weights", summary="FairGrad's alpha-fair weights of the task gradients, unclipped.",
        request=Request("parameters", "gramian"), paper=FAIRGRAD_PAPER, cost="parameters",
        original_code="https://github.com/OptMN-Lab/fairgrad",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None, alpha: float = 1.0,
                 max_iterations: int = 200) -> None:
        super().__init__(num_tasks, target=target)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"Parameter `alpha` should be a positive number (alpha -> 0 is the sum of the gradients: "
                             f"use 'ls'). Found `alpha = {alpha!r}`.")
        self.alpha = float(alpha)
        self.max_iterations = check_int("max_iterations", max_iterations)

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        size = gramian.shape[0]
        weights = np.zeros(size)
        present = nonzero_rows(gramian, "FairGrad", "G w = w^(-1/alpha)")
        if not present.any():
            return weights
        sub = gramian[np.ix_(present, present)]
        if pareto_stationary(sub, step.eps, "FairGrad", "G w = w^(-1/alpha)"):
            return weights
        scale = math.sqrt(float((sub * sub).sum()))  # ||G||_F: solved on G / scale, then scaled back
        with np.errstate(all="ignore"):  # near-stationary gradients may send Newton's iterates far away
            try:
                solution, converged = fair_weights(sub / scale, self.alpha, self.max_iterations)
            except np.linalg.LinAlgError:
                solution, converged = np.full(int(present.sum()), 1.0 / size), False
        if not (converged and np.isfinite(solution).all()):
            warn_not_converged("FairGrad", self.max_iterations)
        weights[present] = solution * scale ** (-self.alpha / (self.alpha + 1))
        return size * weights  # the authors' factor K ("to match the sum loss")


class FairGrad(ClipNorm):
    r"""FairGrad: the update that allocates the tasks' improvements α-fairly, scaled by K and clipped as the authors'.

    Paper: Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024
    (https://arxiv.org/abs/2402.15638), eq. 4 and Algorithm 1. The update ``d = J^T w``
    maximises ``sum_k u_α(g_k . d)`` over a ball, with ``u_α(x) = x^{1-α} / (1-α)`` (``log x`` at
    ``α = 1``): the task's improvement ``g_k . d`` is its "resource". Its optimality condition:

    .. math::

        (G w)_k = g_k \cdot d = w_k^{-1/α} \quad \text{for every } k,\qquad w > 0 ,

    so every task improves (``g_k . d > 0``). ``α = 1`` is Nash-MTL's bargaining solution (proportional fairness); ``α
    -> ∞`` tends to max-min fairness, ``α -> 0`` to the sum of the gradients. ``w`` is computed to rounding as the
    minimiser of a strictly convex function (:func:`fair_weights`, damped Newton steps, on ``G`` divided by its
    Frobenius norm, the solution scaled back by ``||G||_F^{-α/(α+1)}``); the authors solve the equations by
    ``scipy.optimize.least_squares`` from ``1/K`` (default tolerances).

    As the authors' code (OptMN-Lab/fairgrad, ``methods/weight_methods.py``), the shared part receives ``K J^T w`` ("to
    match the sum loss"), clipped to norm ``max_norm`` (1.0 by default, their ``--max_norm``; 0 disables it), and every
    head learns from its own loss unweighted. torchjd 0.18's ``FairGrad`` returns ``J^T w`` (no factor K, no clipping);
    LibMTL's has no factor K nor clipping and weighs the heads by ``w``. The composition: :class:`FairWeights` (the
    weights times K) inside :class:`~mtlzoo.roles.ClipNorm`.

    When the equations have no solution: a zero gradient gets weight 0 and the others share the update; a convex
    combination of the gradients that is zero (a Pareto-stationary point) gives the update 0; Newton's method not
    converged in ``max_iterations`` steps gives its last iterate; each with a :class:`~mtlzoo.errors.SolverWarning` (the
    authors' solver returns its last iterate silently).

    Args:
        alpha: ``α > 0``; 1.0 as the authors' default (their experiments also use 2 and more).
        max_norm: Largest norm of the update (0: no clipping); 1.0 as the authors' code.
        max_iterations: Newton steps before giving up (with a warning).

    Example:
        >>> import torch, mtlzoo
        >>> fairgrad = mtlzoo.create("fairgrad", num_tasks=2, alpha=2.0, max_norm=0.0)
        >>> fairgrad.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))
        tensor([2.0000, 1.5874])
    """

    info = StrategyInfo(
        name="fairgrad",
        summary="Allocates the tasks' improvements alpha-fairly: (G w)_k = w_k^(-1/alpha) (alpha = 1: Nash-MTL).",
        request=Request("parameters", "gramian"), paper=FAIRGRAD_PAPER, properties=frozenset(), cost="parameters",
        original_code="https://github.com/OptMN-Lab/fairgrad",
    )
    """No claim in the metadata: the registry-wide property checks run on zero and Pareto-stationary matrices, where
    FairGrad warns. Where its equations have a solution it conflicts with no task and is permutation invariant
    (tests/strategies/test_fairgrad.py)."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, alpha: float = 1.0, max_norm: float = 1.0,
                 max_iterations: int = 200) -> None:
        super().__init__(FairWeights(num_tasks, target=target, alpha=alpha, max_iterations=max_iterations),
                         max_norm=max_norm)
