r"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among the tasks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack
from torch import nn

from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request
from mtlzoo.roles import ClipNorm, EveryNSteps, GramianAggregator, HostStep
from mtlzoo.solvers import clean_gramian, min_norm_weights
from mtlzoo.strategies.si import NASH_MTL_PAPER
from mtlzoo.strategy import StrategyInfo, Target, check_flag, check_int

_EPS = float(np.finfo(np.float64).eps)
STATIONARY = 1e-14
"""Squared norm (on the unit-Frobenius Gramian) below which the gradients' hull is taken to contain 0."""


def bargaining_weights(gramian: np.ndarray, start: np.ndarray, max_iterations: int = 200) -> tuple[np.ndarray, bool]:
    r"""The positive solution of ``α_k (G α)_k = 1`` for all k, and whether Newton's method converged.

    It minimises the strictly convex, self-concordant ``f(α) = α^T G α / 2 - sum_k log α_k`` (gradient
    ``G α - 1/α``): damped Newton steps ``Δ / (1 + λ)`` (``λ`` the Newton decrement) stay positive and
    converge from any positive start (``start``, first rescaled to the best point on its ray). It exists
    when no convex combination of the rows is zero (checked by the caller).
    """
    alpha = np.where(start > 0, start, 1.0).astype(np.float64)
    curvature = float(alpha @ gramian @ alpha)
    if curvature > 0:
        alpha *= math.sqrt(len(alpha) / curvature)
    for _ in range(max_iterations):
        gradient = gramian @ alpha - 1.0 / alpha
        hessian = gramian.copy()
        hessian.flat[::len(alpha) + 1] += 1.0 / alpha**2
        _, step, info = lapack.dposv(hessian, -gradient)  # positive definite: a Cholesky solve
        if info != 0:  # not positive definite to rounding: LU, as numpy.linalg.solve
            step = np.linalg.solve(hessian, -gradient)
        decrement = math.sqrt(max(float(-gradient @ step), 0.0))
        if decrement < 1e-10:
            return alpha, True
        alpha = alpha + (step / (1.0 + decrement) if decrement > 0.25 else step)
    return alpha, False


def nonzero_rows(gramian: np.ndarray, method: str, problem: str) -> np.ndarray:
    """The rows whose gradient is not zero; a :class:`~mtlzoo.errors.SolverWarning` names the others."""
    present = np.diag(gramian) > 0
    if not present.all():
        warnings.warn(f"{method}: the gradients of tasks (rows) {np.flatnonzero(~present).tolist()} are zero, so "
                      f"{problem} has no solution; they get weight 0 and the other tasks share the update.",
                      SolverWarning, stacklevel=6)
    return present


def pareto_stationary(gramian: np.ndarray, eps: float, method: str, problem: str) -> bool:
    """Whether a convex combination of the rows is zero (then warns that ``problem`` has no solution)."""
    hull = min_norm_weights(clean_gramian(gramian, eps))
    if float(hull @ gramian @ hull) > STATIONARY * float(np.trace(gramian)):
        return False
    warnings.warn(f"{method}: a convex combination of the task gradients is zero (a Pareto-stationary point), so no "
                  f"update improves every task and {problem} has no solution; the update is 0.", SolverWarning,
                  stacklevel=6)
    return True


def warn_not_converged(method: str, iterations: int) -> None:
    warnings.warn(f"{method}: Newton's method did not converge in {iterations} steps (the gradients are close to "
                  "Pareto-stationary); its last iterate is used.", SolverWarning, stacklevel=6)


class NashBargaining(GramianAggregator):
    r"""The Nash bargaining weights among the tasks, unclipped and recomputed every step (Nash-MTL's core).

    Paper: Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022
    (https://arxiv.org/abs/2202.01017), Algorithm 1. The Nash bargaining solution of
    ``max_d sum_k log(g_k . d)`` over a ball is ``d = J^T α`` with ``α > 0`` solving

    .. math::

        α_k (G α)_k = 1 \quad \text{for every } k \qquad (G = J J^\top),

    so ``||d||^2 = α^T G α = K`` whatever the gradients' scale. The authors approximate ``α`` by 20 rounds of a
    convex-concave procedure with cvxpy/ECOS on ``G`` divided by its Frobenius norm; here ``α`` is computed to rounding
    on that ``Ĝ`` by damped Newton steps (:func:`bargaining_weights`), warm-started at the previous step's ``α``, and
    scaled back. Where the problem has no solution, with a :class:`~mtlzoo.errors.SolverWarning`:

    - a task whose gradient is zero gets weight 0 and the others bargain among themselves (torchjd
      0.18 silently keeps its previous weights);
    - a convex combination of the gradients is zero (Pareto-stationary): the update is 0;
    - Newton's method not converged in ``max_iterations`` steps: its last iterate is used.

    Running state: the last weights (``previous_weights``, ones at first as the authors' code), the
    warm start; a task absent from a step keeps its previous weight.

    Args:
        max_iterations: Newton steps before giving up (with a warning).
    """

    info = StrategyInfo(
        name="nash_bargaining",
        summary="Nash bargaining weights among the tasks: alpha_k (G alpha)_k = 1 (Nash-MTL unclipped).",
        request=Request("parameters", "gramian"), paper=NASH_MTL_PAPER, cost="parameters",
        original_code="https://github.com/AvivNavon/nash-mtl",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None, max_iterations: int = 200) -> None:
        super().__init__(num_tasks, target=target)
        self.max_iterations = check_int("max_iterations", max_iterations)
        self.declare_state(previous_weights=torch.ones(num_tasks))

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        previous = self.state.previous_weights.detach().cpu().to(torch.float64).numpy()[step.tasks]
        alpha = self.solve(gramian, previous)
        self.state.write_rows("previous_weights", step.tasks, alpha)  # rounded to the buffer's dtype when committed
        return alpha

    def solve(self, raw: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """``α`` for the raw Gramian, from the warm start ``previous`` (see the class's docstring)."""
        size = math.sqrt(float((raw * raw).sum()))  # ||G||_F
        matrix = raw / size if size > 0 else np.zeros_like(raw)
        present = nonzero_rows(matrix, "Nash-MTL", "the bargaining problem")
        alpha = np.zeros(matrix.shape[0])
        if present.any():
            sub = matrix if present.all() else matrix[np.ix_(present, present)]
            start = previous[present] * math.sqrt(size)
            with np.errstate(all="ignore"):  # near-stationary gradients may send Newton's iterates far away
                try:
                    solution, converged = bargaining_weights(sub, start, self.max_iterations)
                except np.linalg.LinAlgError:
                    solution, converged = np.ones_like(start), False
            converged = converged and bool(np.isfinite(solution).all())
            # A solution bounds the hull away from 0: with d = J^T alpha, g_k . d = 1 / alpha_k and ||d||^2 = K',
            # so ||J^T c||^2 >= 1 / (K' max_k alpha_k^2) for every convex c. Where that bound (halved, for the
            # solver's tolerance) clears the stationarity threshold, the min-norm test would pass: skip it.
            count = int(present.sum())
            if not (converged and 0.5 / (count * float(solution.max()) ** 2) > STATIONARY * float(np.trace(sub))) \
                    and pareto_stationary(sub, _EPS, "Nash-MTL", "the bargaining problem"):
                return alpha
            if not converged:
                warn_not_converged("Nash-MTL", self.max_iterations)
            alpha[present] = solution / math.sqrt(size)  # the solution for the raw Gramian
        return alpha


class NashMTL(ClipNorm):
    r"""Nash-MTL: the update on which the tasks would agree in a Nash bargaining game, clipped, as the authors run it.

    Paper: Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022 (https://arxiv.org/abs/2202.01017). A
    composition of the public roles: the bargaining weights (:class:`NashBargaining`, ``α_k (G α)_k = 1``), recomputed
    every ``update_weights_every``-th optimizer step and reused in between (:class:`~mtlzoo.roles.EveryNSteps`), the
    update then clipped to norm ``max_norm`` (:class:`~mtlzoo.roles.ClipNorm`: ``||J^T α|| <= max_norm``, so with the
    default 1.0 and K >= 2 it has norm 1; 0 disables the clipping), as the authors' code does. The same modifiers wrap
    any Gramian aggregator (``ClipNorm(EveryNSteps(UPGrad(3), 4), 1.0)``).

    Running state: the bargaining weights' warm start (``inner.inner.previous_weights``), the weights reused between
    recomputations and the optimizer step count (``inner.weights``, ``inner``'s ``steps``). A checkpoint of mtlzoo
    0.1.0's ``NashMTL`` (``previous_weights`` and ``step`` at the top) loads into this layout.

    Args:
        max_norm: Largest norm of the update (``0``: no clipping); 1.0 as the authors' code.
        update_weights_every: Recompute the weights every this many optimizer steps.
        max_iterations: Newton steps before giving up (with a warning).
        weighted_heads: Whether head k learns from ``α_k L_k`` (the clipped ``α``), as the authors (nash-mtl's
            ``methods/weight_methods.py``, and LibMTL) back-propagate ``sum_k α_k L_k``, or from ``L_k``, as under the
            other aggregators.

    Example:
        >>> import torch, mtlzoo
        >>> nash = mtlzoo.create("nash_mtl", num_tasks=2, max_norm=0.0)
        >>> nash.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))
        tensor([1., 1.])
    """

    info = StrategyInfo(
        name="nash_mtl", summary="Nash bargaining solution among the tasks: alpha_k (G alpha)_k = 1.",
        request=Request("parameters", "gramian"), paper=NASH_MTL_PAPER, properties=frozenset(), cost="parameters",
        original_code="https://github.com/AvivNavon/nash-mtl",
    )
    """No claim in the metadata: the registry-wide property checks run on zero and Pareto-stationary matrices,
    where Nash-MTL warns. Where its problem has a solution it is permutation invariant, and its update does not
    depend on the gradients' scale (tests/strategies/test_nash_mtl.py)."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, max_norm: float = 1.0,
                 update_weights_every: int = 1, max_iterations: int = 200, weighted_heads: bool = True) -> None:
        check_int("update_weights_every", update_weights_every)
        core = NashBargaining(num_tasks, target=target, max_iterations=max_iterations)
        check_flag("weighted_heads", weighted_heads)
        super().__init__(EveryNSteps(core, update_weights_every), max_norm=max_norm)
        self.weighted_heads = weighted_heads
        self.register_load_state_dict_pre_hook(_from_flat_checkpoint)


def _from_flat_checkpoint(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Map a checkpoint of mtlzoo 0.1.0's ``NashMTL`` (``previous_weights`` and the extra state's ``step`` on the
    strategy itself) onto the composition: the warm start and the reused weights are the old previous weights,
    the step count the old one."""
    old = state_dict.pop(prefix + "previous_weights", None)
    if old is None or prefix + "inner.weights" in state_dict:
        return
    extra = state_dict.get(prefix + "_extra_state")
    saved = extra.get("state", {}) if isinstance(extra, Mapping) else {}
    state_dict[prefix + "inner.inner.previous_weights"] = old
    state_dict[prefix + "inner.weights"] = old.to(torch.float64)
    state_dict[prefix + "inner._extra_state"] = {"settings": {}, "state": {"steps": int(saved.get("step", 0))}}
    state_dict[prefix + "inner.inner._extra_state"] = {"settings": {}, "state": {}}
