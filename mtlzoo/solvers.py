r"""The small optimisation problems that two or more strategies share, solved exactly on the host.

Each is posed on the K x K Gramian ``G = J J^T`` of the task gradients (``O(K^3)`` whatever the number of
parameters) and solved in float64 by an active-set method, numpy and LAPACK called directly. Tolerances are
relative to each row's own scale (``sqrt(G_kk)``), so the answers keep their properties (no conflict with any
task) when the gradients differ in size by many orders of magnitude, whatever the order of the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from mtlzoo.errors import NonFiniteGradientError, SolverError

_EPS = float(np.finfo(np.float64).eps)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def to_host(tensor: Tensor) -> np.ndarray:
    """A (small) tensor as a float64 numpy array on the host (a copy)."""
    tensor = tensor.detach()
    if tensor.dtype not in _NUMPY_DTYPES:
        tensor = tensor.to(torch.float64)
    return tensor.cpu().numpy().astype(np.float64)


def from_host(array: np.ndarray | Sequence[float], like: Tensor) -> Tensor:
    """A host array as a tensor of ``like``'s dtype and device (rounded once, as ``Tensor.to`` rounds)."""
    dtype = _NUMPY_DTYPES.get(like.dtype)
    if dtype is None:
        tensor = torch.from_numpy(np.array(array, dtype=np.float64)).to(like.dtype)
    else:
        tensor = torch.from_numpy(np.array(array, dtype=dtype))
    return tensor if like.device.type == "cpu" else tensor.to(like.device)


def host_gramian(gramian: Tensor, what: str = "the solver") -> np.ndarray:
    """The Gramian as a float64 numpy array on the host, checked square and finite, scaled to unit trace,
    and made positive semi-definite (:func:`clean_gramian` with the input dtype's rounding unit).

    Raises:
        NonFiniteGradientError: The Gramian is not finite (``what`` names the caller in the message).
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"Parameter `gramian` should be a square matrix. Found `gramian.shape = "
                         f"{tuple(gramian.shape)}`.")
    array = to_host(gramian)
    if not np.isfinite(array).all():
        raise NonFiniteGradientError(f"{what}: the Gramian of the task gradients has non-finite entries.")
    return clean_gramian(array, float(torch.finfo(gramian.dtype).eps))


def clean_gramian(array: np.ndarray, eps: float) -> np.ndarray:
    """A finite float64 Gramian scaled to unit trace and made positive semi-definite, on the rows' own scales.

    The correlation matrix ``C = D^-1 G D^-1`` (``D = diag(sqrt(G_kk))``) has its eigenvalues below ``K eps λ_max(C)``
    (``eps`` the rounding unit of the dtype ``G`` was computed in) set to 0, so that rows dependent up to rounding count
    as such; the result is ``D C D`` over its trace (``G`` over its trace where nothing is cut). Cutting on ``C``, not
    ``G``, keeps a task whose gradient is 1e-6 of another's. Zero rows stay zero.
    """
    if array.size == 0:
        return array
    array = (array + array.T) / 2
    scales = np.sqrt(np.maximum(array.diagonal(), 0.0))
    present = scales > 0
    if not present.any():
        return np.zeros_like(array)
    inverse = np.where(present, 1.0 / np.where(present, scales, 1.0), 0.0)
    values, vectors = eigh(array * np.multiply.outer(inverse, inverse))
    cutoff = max(float(values[-1]), 0.0) * array.shape[0] * eps
    if not values[0] > cutoff:  # else nothing is cut: G is kept as it is
        values = np.where(values > cutoff, values, 0.0)
        array = ((vectors * values) @ vectors.T) * np.multiply.outer(scales, scales)
    total = float(array.trace())
    if not total > 0:
        return np.zeros_like(array)
    array = array / total
    return (array + array.T) / 2


def unit_trace(array: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """A host Gramian divided by its trace (zeros where the trace is not positive), plus ``ridge I``."""
    trace = float(array.trace())
    unit = array / trace if trace > 0 else np.zeros_like(array)
    if ridge:
        unit.flat[::unit.shape[0] + 1] += ridge
    return unit


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.linalg.eigh`` (eigenvalues ascending), LAPACK's syevd called directly."""
    values, vectors, info = lapack.dsyevd(matrix, compute_v=1, lower=1)
    if info != 0:
        return np.linalg.eigh(matrix)  # raises numpy's LinAlgError
    return values, vectors


@lru_cache(maxsize=64)
def _gelsd_workspace(rows: int, columns: int) -> tuple[int, int]:
    work, iwork, info = lapack.dgelsd_lwork(rows, columns, 1, -1.0)
    if info != 0:  # pragma: no cover - a workspace query does not fail
        raise SolverError(f"LAPACK gelsd workspace query failed (info {info}).")
    return int(work), int(iwork)


def lstsq(matrix: np.ndarray, rhs: np.ndarray, cutoff: float | None = None) -> np.ndarray:
    """``numpy.linalg.lstsq(matrix, rhs, rcond=cutoff)[0]`` for a small square system (default ``cutoff``:
    ``eps K``), LAPACK's gelsd called directly: a fraction of numpy's per-call overhead."""
    size = matrix.shape[0]
    if size == 0:
        return np.zeros(0)
    cutoff = _EPS * size if cutoff is None else cutoff
    work, iwork = _gelsd_workspace(size, size)
    solution, _, _, info = lapack.dgelsd(matrix, rhs, work, iwork, cond=cutoff)
    if info != 0:
        return np.linalg.lstsq(matrix, rhs, rcond=cutoff)[0]  # raises numpy's LinAlgError
    return solution


def min_norm_simplex(gramian: Tensor) -> Tensor:
    r"""Weights ``w`` of the minimum-norm point of the convex hull of the rows: ``min_{w >= 0, 1^T w = 1} w^T G w``.

    Wolfe's algorithm ("Finding the nearest point in a polytope", Math. Programming 1976) on the Gramian: a corral of
    affinely independent rows grows by the row that most decreases the norm and shrinks towards its affine minimiser
    until that lies in the hull. It stops when no row ``p_j`` has ``x . p_j < ||x||^2`` (up to rounding), the optimality
    condition, so ``x = J^T w`` is exact and unique; ``w`` is unique when the rows are affinely independent.

    Args:
        gramian: ``G = J J^T``, K x K, symmetric positive semi-definite.

    Returns:
        The K weights (non-negative, summing to 1), in the Gramian's dtype and device.

    Raises:
        NonFiniteGradientError: The Gramian is not finite.
        SolverError: No convergence in ``50 K + 100`` corral changes (not observed; rounding only).
    """
    matrix = host_gramian(gramian, "min_norm_simplex")
    return from_host(min_norm_weights(matrix), gramian)


def min_norm_weights(matrix: np.ndarray) -> np.ndarray:
    """:func:`min_norm_simplex` on a host Gramian made by :func:`clean_gramian`. A row enters the corral when
    ``x . p_j < ||x||^2`` by more than ``1e-12 sqrt(G_jj) s``, ``s = sum_k w_k sqrt(G_kk)`` (a bound of ``||x||``):
    relative to row ``j``'s own size, so that a task whose gradient is tiny beside another's stays free of conflict."""
    size = matrix.shape[0]
    weights = np.zeros(size)
    if size == 0:
        return weights
    diagonal = matrix.diagonal()
    scales = np.sqrt(np.maximum(diagonal, 0.0))
    interior = _definite_affine_minimiser(matrix, scales)
    if interior is not None:
        return interior
    start = int(diagonal.argmin())
    corral = [start]
    weights[start] = 1.0
    for _ in range(50 * size + 100):
        products = matrix @ weights
        norm = float(weights @ products)
        reach = float(scales @ weights)
        slack = products - norm + 1e-12 * (scales + reach) * reach
        candidate = int(slack.argmin())
        if slack[candidate] >= 0 or candidate in corral:
            break
        corral.append(candidate)
        if not _minor_cycle(matrix, weights, corral):
            break  # the new row is affinely dependent on the corral up to rounding: optimal
    else:
        raise SolverError(f"min_norm_simplex did not converge on a {size} x {size} Gramian.")
    weights = np.clip(weights, 0.0, None)
    weights /= weights.sum()
    return weights


def _minor_cycle(matrix: np.ndarray, weights: np.ndarray, corral: list[int]) -> bool:
    """Wolfe's minor cycle, in place: move ``weights`` towards the corral's affine minimiser, dropping
    the rows whose weight reaches 0, until that minimiser lies in the corral's hull.

    Returns ``False`` (and drops the row just added) when that row cannot enter: rounding only.
    """
    while True:
        affine = _affine_minimiser(matrix[np.ix_(corral, corral)])
        if affine.min() > _EPS:
            weights[:] = 0.0
            weights[corral] = affine
            return True
        current = weights[corral]
        if current[-1] <= 0 and affine[-1] <= _EPS:
            corral.pop()
            return False
        falling = (affine <= _EPS) & (current > affine)
        ratios = np.where(falling, current / np.where(falling, current - affine, 1.0), np.inf)
        blocking = int(ratios.argmin())
        moved = current + min(float(ratios[blocking]), 1.0) * (affine - current)
        moved[blocking] = 0.0
        keep = moved > _EPS
        weights[:] = 0.0
        weights[np.array(corral)[keep]] = moved[keep]
        corral[:] = [row for row, kept in zip(corral, keep.tolist()) if kept]
        if len(corral) == 1:
            weights[corral] = 1.0
            return True


def _definite_affine_minimiser(matrix: np.ndarray, scales: np.ndarray) -> np.ndarray | None:
    """Wolfe's answer when every row ends in the corral, found at once: where the rows are linearly independent
    (a Cholesky factor of ``C = D^-1 G D^-1`` with a pivot above ``K eps``) and the affine minimiser
    ``w ∝ G^-1 1`` has every weight above rounding, it is the unique minimum-norm point of the simplex (its
    products ``G w`` are all equal to ``w^T G w``); else ``None``, and Wolfe's algorithm runs."""
    if not (scales > 0).all():
        return None
    inverse = 1.0 / scales
    factor, info = lapack.dpotrf(matrix * np.multiply.outer(inverse, inverse), lower=1)
    if info != 0 or float(factor.diagonal().min()) ** 2 <= matrix.shape[0] * _EPS:
        return None
    solution, info = lapack.dpotrs(factor, inverse, lower=1)
    weights = solution * inverse
    total = float(weights.sum())
    if info != 0 or not total > 0:
        return None
    weights = weights / total
    return weights if float(weights.min()) > _EPS else None


def _affine_minimiser(block: np.ndarray) -> np.ndarray:
    """``argmin w^T G_S w`` s.t. ``1^T w = 1`` (``G_S`` the corral's block): the bordered system
    ``[[G_S, 1], [1^T, 0]] [w; λ] = [0; 1]``, solved in ``u = D w`` (``D = diag(sqrt(G_kk))``, the border
    scaled to a largest entry of 1), so that rows of very different sizes keep their digits."""
    count = block.shape[0]
    scales = np.sqrt(np.maximum(block.diagonal(), 0.0))
    safe = np.where(scales > 0, scales, 1.0)
    border = 1.0 / safe
    largest = float(border.max())
    system = np.zeros((count + 1, count + 1))
    system[:count, :count] = block / np.multiply.outer(safe, safe)
    system[:count, count] = border / largest
    system[count, :count] = border / largest
    rhs = np.zeros(count + 1)
    rhs[count] = 1.0 / largest
    return lstsq(system, rhs)[:count] / safe


def _nonnegative_quadratics(hessian: np.ndarray, linears: np.ndarray) -> np.ndarray:
    r"""``argmin_{x >= 0} 1/2 x^T H x - f^T x`` for a positive semi-definite H and each row ``f`` of ``linears``,
    by Lawson and Hanson's active-set method on the normal equations (``H = A^T A``, ``f = A^T b``: non-negative
    least squares).

    Each inner step moves by the minimum-norm step to the minimiser on the passive set, so a newly
    freed coordinate always grows, also when H is singular. Solved in ``y = D x``, ``D = diag(sqrt(H_kk))``
    (on ``D^-1 H D^-1``, of unit diagonal), so that tolerances and cut-offs are relative to each row's own
    size: rows 1e6 times apart are solved as accurately as rows of one size, in any order. The loop's first
    optimality test is taken for all rows at once; only a row whose start is not optimal enters the loop.
    """
    scales = np.sqrt(np.maximum(hessian.diagonal(), 0.0))
    safe = np.where(scales > 0, scales, 1.0)
    hessian = hessian / np.multiply.outer(safe, safe)
    unit = (scales > 0).astype(np.float64)
    linears = linears / safe
    reach = np.abs(linears).max(axis=1, initial=0.0)
    solutions = np.zeros(linears.shape)
    passive = linears - 1e-12 * unit * reach[:, None] > 0  # the coordinates violated at x = 0
    counts = passive.sum(axis=1)
    rows, columns = (passive & (counts == 1)[:, None]).nonzero()  # one violated: its minimiser is f_j / H_jj
    diagonal = hessian.diagonal()[columns]
    solutions[rows, columns] = np.where(diagonal > 0, linears[rows, columns] / np.where(diagonal > 0, diagonal, 1.0), 0)
    passive[rows, columns] = diagonal > 0
    for row in (counts > 1).nonzero()[0]:
        solutions[row] = _start(hessian, linears[row], passive[row])
    gradients = linears - solutions @ hessian
    tolerances = 1e-12 * unit * (reach + np.abs(solutions).sum(axis=1))[:, None]  # rounding of each row's gradient
    for row in (~passive & (gradients - tolerances > 0)).any(axis=1).nonzero()[0]:
        solutions[row] = _lawson_hanson(hessian, linears[row], unit, reach[row], solutions[row], passive[row])
    return solutions / safe


def _start(hessian: np.ndarray, linear: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """Where Lawson and Hanson's loop starts on a scaled problem of :func:`_nonnegative_quadratics` whose coordinates
    ``passive`` are violated at ``x = 0``: the minimiser on them where it is positive (a state of the loop, often its
    last), else ``x = 0`` (``passive`` then emptied in place)."""
    x = np.zeros(hessian.shape[0])
    index = passive.nonzero()[0]
    start = lstsq(hessian[index[:, None], index], linear[index])
    if start.min() > 0:
        x[index] = start
    else:
        passive[:] = False
    return x


def _lawson_hanson(hessian: np.ndarray, linear: np.ndarray, unit: np.ndarray, reach: float, x: np.ndarray,
                   passive: np.ndarray) -> np.ndarray:
    """Lawson and Hanson's active-set loop on a scaled problem of :func:`_nonnegative_quadratics`, from ``x`` and its
    passive set (:func:`_start`)."""
    size = hessian.shape[0]
    x, passive = x.copy(), passive.copy()
    for _ in range(10 * size + 50):
        gradient = linear - hessian @ x
        tolerance = 1e-12 * unit * (reach + float(np.abs(x).sum()))  # rounding of each row's gradient
        free = np.where(passive, -np.inf, gradient - tolerance)
        candidate = int(free.argmax())
        if free[candidate] <= 0:  # also when every coordinate is passive (free is all -inf)
            return x
        passive[candidate] = True
        for _ in range(size + 1):
            index = passive.nonzero()[0]
            block = hessian[index[:, None], index]
            current = x[index]
            target = current + lstsq(block, linear[index] - block @ current)
            if target.min() > 0:
                x[:] = 0.0
                x[index] = target
                break
            falling = target <= 0
            ratios = np.where(falling, current / np.where(falling, current - target, 1.0), np.inf)
            blocking = int(ratios.argmin())
            moved = current + float(ratios[blocking]) * (target - current)
            moved[blocking] = 0.0
            moved[moved < 0] = 0.0
            x[:] = 0.0
            x[index] = moved
            passive[index] = moved > 0
            if not passive.any():
                break
    raise SolverError(f"The non-negative quadratic problem of size {size} did not converge.")


def project_to_simplex(values: np.ndarray) -> np.ndarray:
    """The point of the simplex ``{w >= 0, sum_k w_k = 1}`` nearest to ``values`` (float64, host).

    Exact, by sorting (Held, Wolfe & Crowder 1974; Duchi et al. 2008): ``w = max(v - θ, 0)`` with the one
    ``θ`` that makes the entries sum to 1.
    """
    ordered = np.sort(values)[::-1]
    sums = np.cumsum(ordered) - 1.0
    count = np.arange(1, values.size + 1)
    last = int((ordered - sums / count > 0).nonzero()[0][-1])
    return np.maximum(values - sums[last] / (last + 1), 0.0)


def project_to_dual_cone(weights: Tensor, gramian: Tensor) -> Tensor:
    r"""Weights ``v`` with ``J^T v`` the projection of ``J^T u`` onto the dual cone ``{d : J d >= 0}``.

    By duality (Quinton & Rey, "Jacobian descent for multi-objective optimization", Prop. 1),
    ``v = argmin_{v >= u} v^T G v``: with ``x = v - u >= 0`` a non-negative quadratic problem, solved exactly by an
    active-set method (Lawson and Hanson's). The projection ``J^T v`` is unique; ``v`` is unique when ``G`` is
    non-singular. At the solution ``G v >= 0`` (``J^T v`` conflicts with no row) with equality wherever ``v_k > u_k``.

    Args:
        weights: ``u``, shape ``(..., K)``: one problem per vector (UPGrad projects every ``e_k / K``).
        gramian: ``G = J J^T``, K x K, symmetric positive semi-definite.

    Returns:
        ``v``, shaped like ``weights``, in the Gramian's dtype and device.

    Raises:
        NonFiniteGradientError: The Gramian is not finite.
        SolverError: The active-set method did not converge (not observed; rounding only).
    """
    matrix = host_gramian(gramian, "project_to_dual_cone")
    if weights.shape[-1:] != gramian.shape[:1]:
        raise ValueError(f"Parameter `weights` should end with the Gramian's size {gramian.shape[0]}. Found "
                         f"`weights.shape = {tuple(weights.shape)}`.")
    solutions = dual_cone_weights(to_host(weights).reshape(-1, matrix.shape[0]), matrix)
    return from_host(solutions.reshape(weights.shape), gramian)


def dual_cone_weights(targets: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """:func:`project_to_dual_cone` on the host: one solution per row of ``targets`` (N x K), for a Gramian made by
    :func:`clean_gramian` (the solutions do not depend on its scale)."""
    solutions = targets.copy()
    if not targets.shape[0]:
        return solutions
    linear = -(targets @ matrix)  # row r: -G u_r, the linear term of problem r
    # Lawson-Hanson's first test, for all the problems at once: where no coordinate of -G u is above its row's
    # rounding, x = 0 is optimal (J^T u is already in the cone) and v = u.
    scales = np.sqrt(np.maximum(matrix.diagonal(), 0.0))
    tolerance = 1e-12 * np.multiply.outer(np.abs(targets) @ scales, scales)
    rows = ((linear - tolerance).max(axis=1) > 0).nonzero()[0]
    if rows.size:
        solutions[rows] += _nonnegative_quadratics(matrix, linear[rows])
    return solutions
