r"""Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution among the tasks."""

from __future__ import annotations

import math
import warnings
from operator import mul
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from mtlzoo import solvers
from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.solvers import clean_gramian, min_norm_weights
from mtlzoo.strategies._surgery import GramianSurgery
from mtlzoo.strategy import Paper, StrategyInfo, Target

_EPS = float(np.finfo(np.float64).eps)
STATIONARY = 1e-14
"""Squared norm (on the unit-Frobenius Gramian) below which the gradients' hull is taken to contain 0."""
SMALL_STEPS = 20
"""Newton steps that :func:`small_bargaining_weights` takes at most: a warm start needs two or three, a cold one
about ten; more is the mark of a near-stationary, ill-conditioned problem, left to the numpy path as before."""


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


def _quadratic(matrix: list[list[float]], vector: list[float]) -> float:
    """``v^T M v`` on Python floats."""
    return sum(value * sum(map(mul, row, vector)) for value, row in zip(vector, matrix))


def _newton_step(gramian: list[list[float]], alpha: list[float], gradient: list[float]) -> list[float] | None:
    """The Newton step ``-(G + diag(1 / α^2))^{-1} ∇`` on Python floats: the Hessian's Cholesky factor, row by row
    with the forward substitution, then the backward one; ``None`` at a pivot that is not positive (rounding)."""
    size = len(alpha)
    factor: list[list[float]] = []
    forward: list[float] = []
    for i in range(size):
        source = gramian[i]
        row: list[float] = []
        for j in range(i):
            other = factor[j]
            value = source[j]
            for k in range(j):
                value -= row[k] * other[k]
            row.append(value / other[j])
        pivot = source[i] + 1.0 / (alpha[i] * alpha[i])
        for value in row:
            pivot -= value * value
        if not pivot > 0:
            return None
        root = math.sqrt(pivot)
        row.append(root)
        factor.append(row)
        value = -gradient[i]
        for k in range(i):
            value -= row[k] * forward[k]
        forward.append(value / root)
    step = [0.0] * size
    for i in range(size - 1, -1, -1):
        value = forward[i]
        for k in range(i + 1, size):
            value -= factor[k][i] * step[k]
        step[i] = value / factor[i][i]
    return step


def small_bargaining_weights(gramian: list[list[float]], start: list[float],
                             max_iterations: int) -> list[float] | None:
    """:func:`bargaining_weights` on Python floats (up to :data:`mtlzoo.solvers.SMALL` tasks): the same start, damped
    Newton steps and stopping rule, each Newton system solved by a Cholesky factorisation of the Hessian
    ``G + diag(1 / α^2)`` (:func:`_newton_step`). Only a converged, finite answer is returned: ``None`` where a
    pivot is not positive (rounding), where the arithmetic fails (a zero or overflowing iterate) or where Newton's
    method does not converge in ``max_iterations`` steps; the caller then runs :func:`bargaining_weights` from the
    same start, so that every such case is the numpy path's, warnings included.

    Near the solution both paths' iterates agree to rounding times the Hessian's condition number: on a
    well-conditioned problem the answers agree to ~1e-15, on a near-stationary one (large ``α``) less closely,
    as two runs of either path on inputs one rounding apart would."""
    size = len(start)
    alpha = [value if value > 0 else 1.0 for value in start]
    try:
        curvature = _quadratic(gramian, alpha)
        if curvature > 0:
            scale = math.sqrt(size / curvature)
            alpha = [value * scale for value in alpha]
        for _ in range(max_iterations):
            gradient = [sum(map(mul, row, alpha)) - 1.0 / value for row, value in zip(gramian, alpha)]
            step = _newton_step(gramian, alpha, gradient)
            if step is None:
                return None
            decrement = math.sqrt(max(-sum(map(mul, gradient, step)), 0.0))
            if decrement < 1e-10:
                return alpha if all(map(math.isfinite, alpha)) else None
            if decrement > 0.25:
                damping = 1.0 + decrement
                alpha = [value + change / damping for value, change in zip(alpha, step)]
            else:
                alpha = [value + change for value, change in zip(alpha, step)]
    except (ArithmeticError, ValueError):  # ZeroDivisionError, OverflowError; math.sqrt of a negative
        return None
    return None


def _zero_rows_message(rows: list[int]) -> str:
    return (f"Nash-MTL: the gradients of tasks (rows) {rows} are zero, so the bargaining problem has no solution; "
            "they get weight 0 and the other tasks bargain among themselves.")


_STATIONARY_MESSAGE = ("Nash-MTL: a convex combination of the task gradients is zero (a Pareto-stationary point), so "
                       "no update improves every task and the bargaining problem has no solution; the update is 0.")


def _not_converged_message(max_iterations: int) -> str:
    return (f"Nash-MTL: Newton's method did not converge in {max_iterations} steps (the gradients are close to "
            "Pareto-stationary); its last iterate is used.")


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
    ``Ĝ`` by damped Newton steps, warm-started at the previous step's ``α``, and scaled back:
    on Python floats after one transfer of the Gramian up to :data:`mtlzoo.solvers.SMALL` tasks
    (at most :data:`SMALL_STEPS` steps), on numpy / LAPACK beyond and where those steps do not
    converge. As the authors' code, the update is clipped to norm ``max_norm``
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

    def compute(self, inputs: StepInputs) -> Update:
        gramian = inputs.gramian
        assert gramian is not None
        if gramian.shape[0] <= solvers.SMALL:  # one transfer, then Python floats
            rows = gramian.tolist()
            if math.isfinite(sum(map(sum, rows))):  # else the base class (its finiteness check, numpy)
                weights = self._small_weights(rows, inputs.tasks.tolist(), inputs.micro_batch)
                return Update(weights=torch.tensor(weights, dtype=gramian.dtype, device=gramian.device))
        return super().compute(inputs)

    def weights_for(self, gramian: Tensor, losses: Tensor, tasks: Tensor, micro_batch: int) -> Tensor:
        if gramian.shape[0] <= solvers.SMALL:
            weights = self._small_weights(gramian.tolist(), tasks.tolist(), micro_batch)
            return torch.tensor(weights, dtype=gramian.dtype, device=gramian.device)
        return super().weights_for(gramian, losses, tasks, micro_batch)

    def _small_weights(self, rows: list[list[float]], tasks: list[int], micro_batch: int) -> list[float]:
        """:meth:`host_weights` on Python floats (up to :data:`mtlzoo.solvers.SMALL` tasks): the same state, solve
        (:meth:`_small_solve`) and clipping."""
        buffer = self.previous_weights
        everyone = buffer.tolist()
        previous = [everyone[k] for k in tasks]
        if self.step % self.update_weights_every == 0:
            alpha = self._small_solve(rows, previous)
            if micro_batch == 0:
                for k, value in zip(tasks, alpha):
                    everyone[k] = value  # rounded to the buffer's dtype below
                self._staged["previous_weights"] = torch.tensor(everyone, dtype=buffer.dtype, device=buffer.device)
        else:
            alpha = previous
        if self.max_norm > 0:
            norm = math.sqrt(max(_quadratic(rows, alpha), 0.0))
            if norm > self.max_norm:
                scale = self.max_norm / norm
                alpha = [value * scale for value in alpha]
        return alpha

    def _small_solve(self, raw: list[list[float]], previous: list[float]) -> list[float]:
        """:meth:`_solve` on Python floats: at most :data:`SMALL_STEPS` Newton steps by
        :func:`small_bargaining_weights`; where they do not converge, :func:`bargaining_weights` (numpy) from the same
        start and on the same normalised Gramian (bit for bit), as :meth:`_solve`; the hull test (rare) on numpy."""
        count = len(raw)
        array = np.array(raw)
        size = math.sqrt(float((array * array).sum()))  # ||G||_F, rounded as :meth:`_solve` rounds it
        matrix = [[value / size for value in row] for row in raw] if size > 0 else [[0.0] * count for _ in raw]
        present = [k for k in range(count) if matrix[k][k] > 0]
        alpha = [0.0] * count
        if len(present) < count:
            warnings.warn(_zero_rows_message([k for k in range(count) if not matrix[k][k] > 0]), SolverWarning,
                          stacklevel=5)
        if present:
            sub = matrix if len(present) == count else [[matrix[i][j] for j in present] for i in present]
            root = math.sqrt(size)
            start = [previous[k] * root for k in present]
            solution = small_bargaining_weights(sub, start, min(self.max_iterations, SMALL_STEPS))
            converged = solution is not None
            if solution is None:  # the numpy path, as :meth:`_solve`
                with np.errstate(all="ignore"):
                    try:
                        found, converged = bargaining_weights(np.array(sub), np.array(start), self.max_iterations)
                    except np.linalg.LinAlgError:
                        found, converged = np.ones(len(start)), False
                converged = converged and bool(np.isfinite(found).all())
                solution = found.tolist()
            # The hull test is skipped where the solution bounds the hull away from 0, as in :meth:`_solve`.
            largest = max(solution)
            if not (converged and 0.5 / (len(present) * largest * largest) > STATIONARY * sum(
                    sub[k][k] for k in range(len(present)))):
                block = np.array(sub)
                hull = min_norm_weights(clean_gramian(block, _EPS))
                if float(hull @ block @ hull) <= STATIONARY * float(np.trace(block)):
                    warnings.warn(_STATIONARY_MESSAGE, SolverWarning, stacklevel=5)
                    return alpha
            if not converged:
                warnings.warn(_not_converged_message(self.max_iterations), SolverWarning, stacklevel=5)
            for k, value in zip(present, solution):
                alpha[k] = value / root  # the solution for the raw Gramian
        return alpha

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
            warnings.warn(_zero_rows_message(np.flatnonzero(~present).tolist()), SolverWarning, stacklevel=5)
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
                    warnings.warn(_STATIONARY_MESSAGE, SolverWarning, stacklevel=5)
                    return alpha
            if not converged:
                warnings.warn(_not_converged_message(self.max_iterations), SolverWarning, stacklevel=5)
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
