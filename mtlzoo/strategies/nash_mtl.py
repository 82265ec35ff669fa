r"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among the tasks."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request
from mtlzoo.solvers import clean_gramian, min_norm_weights
from mtlzoo.strategies._surgery import GramianSurgery
from mtlzoo.strategy import Paper, StrategyInfo, Target

_EPS = float(np.finfo(np.float64).eps)
STATIONARY = 1e-14
"""Squared norm (on the unit-Frobenius Gramian) below which the gradients' hull is taken to contain 0."""


def bargaining_weights(gramian: np.ndarray, start: np.ndarray, max_iterations: int = 200) -> tuple[np.ndarray, bool]:
    r"""The positive solution of ``α_k (G α)_k = 1`` for all k, and whether Newton's method converged.

    It is the minimiser of the strictly convex ``f(α) = α^T G α / 2 - sum_k log α_k`` (whose
    gradient ``G α - 1/α`` vanishes exactly there), a self-concordant function: damped Newton
    steps ``Δ / (1 + λ)`` stay positive and converge from any positive start, quadratically at
    the end (``λ`` is the Newton decrement). ``start`` is first rescaled to the best point on its
    ray. It exists when no convex combination of the rows is zero (checked by the caller).
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


class NashMTL(GramianSurgery):
    r"""Nash-MTL: the update on which the tasks would agree in a Nash bargaining game.

    Paper: Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022
    (https://arxiv.org/abs/2202.01017), Algorithm 1. The Nash bargaining solution of
    ``max_d sum_k log(g_k . d)`` over a ball is ``d = J^T α`` with ``α > 0`` solving

    .. math::

        α_k (G α)_k = 1 \quad \text{for every } k \qquad (G = J J^\top),

    so ``||d||^2 = α^T G α = K`` whatever the gradients' (or the losses') scale. The authors
    approximate ``α`` by 20 rounds of a convex-concave procedure with cvxpy/ECOS, on ``G`` divided
    by its Frobenius norm with the constraint scaled back (the same ``α``); here ``α`` is
    computed to rounding as the minimiser of ``α^T Ĝ α / 2 - sum_k log α_k`` on that normalised
    ``Ĝ`` by damped Newton steps (numpy), warm-started at the previous step's ``α``, and scaled
    back. As the authors' code, the update is clipped to norm ``max_norm``
    (``||J^T α|| <= max_norm``, so with the default 1.0 and K >= 2 it has norm 1; 0 disables
    the clipping), and with ``update_weights_every = m`` the weights are recomputed every m-th
    optimizer step and reused (then clipped anew) in between.

    When the bargaining problem has no solution:

    - a task whose gradient is zero (``α_k (G α)_k = 1`` cannot hold): it has nothing to bargain
      with; it gets weight 0 and the others bargain among themselves, with a
      :class:`~mtlzoo.errors.SolverWarning` (torchjd 0.18 silently keeps its previous weights);
    - a convex combination of the (non-zero) gradients is zero (a Pareto-stationary point: no
      update improves every task): the update is 0, with a :class:`~mtlzoo.errors.SolverWarning`;
    - Newton's method not converged in ``max_iterations`` steps (near-stationary gradients): its
      last iterate is used, with a :class:`~mtlzoo.errors.SolverWarning`.

    Running state: the previous weights (a ``(K,)`` buffer, ones at first as the authors' code)
    and the optimizer step count; both advance at ``advance()``, from the step's first
    micro-batch. A task absent from a step keeps its previous weight.

    Args:
        num_tasks: K.
        target: ``"parameters"`` (default) or ``"representation"``.
        max_norm: Largest norm of the update (``0``: no clipping); 1.0 as the authors' code.
        update_weights_every: Recompute the weights every this many optimizer steps.
        max_iterations: Newton steps before giving up (with a warning).

    Example:
        >>> import torch, mtlzoo
        >>> nash = mtlzoo.create("nash_mtl", num_tasks=2, max_norm=0.0)
        >>> nash.aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))
        tensor([1., 1.])
    """

    info = StrategyInfo(
        name="nash_mtl",
        kind="surgery",
        summary="Nash bargaining solution among the tasks: alpha_k (G alpha)_k = 1.",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Aviv Navon", "Aviv Shamsian", "Idan Achituve", "Haggai Maron", "Kenji Kawaguchi",
                     "Gal Chechik", "Ethan Fetaya"),
            title="Multi-Task Learning as a Bargaining Game",
            venue="ICML",
            year=2022,
            url="https://arxiv.org/abs/2202.01017",
        ),
        properties=frozenset(),
        cost="parameters",
        original_code="https://github.com/AvivNavon/nash-mtl",
    )
    """No claim in the metadata: the registry-wide property checks run on zero and Pareto-stationary matrices,
    where Nash-MTL warns. Where its problem has a solution it is permutation invariant, and its update does not
    depend on the gradients' scale (tests/strategies/test_nash_mtl.py)."""

    def __init__(self, num_tasks: int, *, target: Target | None = None, max_norm: float = 1.0,
                 update_weights_every: int = 1, max_iterations: int = 200) -> None:
        super().__init__(num_tasks, target=target)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not (
                max_norm >= 0 and math.isfinite(max_norm)):
            raise ValueError(f"Parameter `max_norm` should be a non-negative number. Found `max_norm = {max_norm!r}`.")
        for name, value in (("update_weights_every", update_weights_every), ("max_iterations", max_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Parameter `{name}` should be a positive int. Found `{name} = {value!r}`.")
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.max_iterations = max_iterations
        self.register_buffer("previous_weights", torch.ones(num_tasks))
        self.step = 0
        self._staged: dict[str, Tensor] = {}

    def host_weights(self, matrix: np.ndarray, eps: float, losses: Tensor, tasks: Tensor,
                     micro_batch: int) -> np.ndarray:
        index = tasks.cpu().numpy()
        previous = self.previous_weights.detach().cpu().numpy().astype(np.float64)[index]
        if self.step % self.update_weights_every == 0:
            alpha = self._solve(matrix, previous)
            if micro_batch == 0:
                staged = self.previous_weights.detach().cpu().numpy().copy()
                staged[index] = alpha  # rounded to the buffer's dtype
                self._staged["previous_weights"] = torch.from_numpy(staged).to(self.previous_weights.device)
        else:
            alpha = previous
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ matrix @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha

    def _solve(self, raw: np.ndarray, previous: np.ndarray) -> np.ndarray:
        size = math.sqrt(float((raw * raw).sum()))  # ||G||_F
        matrix = raw / size if size > 0 else np.zeros_like(raw)
        present = np.diag(matrix) > 0
        alpha = np.zeros(matrix.shape[0])
        if not present.all():
            warnings.warn(f"Nash-MTL: the gradients of tasks (rows) {np.flatnonzero(~present).tolist()} are zero, so "
                          "the bargaining problem has no solution; they get weight 0 and the other tasks bargain "
                          "among themselves.", SolverWarning, stacklevel=5)
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
            if not (converged and 0.5 / (count * float(solution.max()) ** 2) > STATIONARY * float(np.trace(sub))):
                hull = min_norm_weights(clean_gramian(sub, _EPS))  # min_norm_simplex on the float64 sub-Gramian
                if float(hull @ sub @ hull) <= STATIONARY * float(np.trace(sub)):
                    warnings.warn("Nash-MTL: a convex combination of the task gradients is zero (a Pareto-stationary "
                                  "point), so no update improves every task and the bargaining problem has no "
                                  "solution; the update is 0.", SolverWarning, stacklevel=5)
                    return alpha
            if not converged:
                warnings.warn(f"Nash-MTL: Newton's method did not converge in {self.max_iterations} steps (the "
                              "gradients are close to Pareto-stationary); its last iterate is used.",
                              SolverWarning, stacklevel=5)
            alpha[present] = solution / math.sqrt(size)  # the solution for the raw Gramian
        return alpha

    def _commit(self) -> None:
        for name, value in self._staged.items():
            setattr(self, name, value)
        self._staged = {}
        self.step += 1

    def _drop_staged(self) -> None:
        self._staged = {}

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._staged = {}
