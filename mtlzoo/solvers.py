r"""The small optimisation problems that two or more strategies share, solved exactly.

Both problems are posed on the K x K Gramian ``G = J J^T`` of the task gradients (the rows of
``J``), never on the gradients themselves, so they cost ``O(K^3)`` whatever the number of
parameters. They run on the host, in float64, with numpy and LAPACK called directly (an active-set
method each: exact up to rounding, no iteration count to tune, no tolerance that depends on the
gradients' scale); the answer comes back as a tensor of the Gramian's dtype and device. Each has a
host face (:func:`min_norm_weights`, :func:`dual_cone_weights`) for the strategies that do all of a
step's K x K work on the host after one transfer (:func:`to_host`, :func:`from_host`). A one-off
problem of a single strategy stays in that strategy's module.

Up to :data:`SMALL` tasks, a Gramian that :func:`definite_unit` certifies safely positive definite
(the common case on a representation wider than K) is solved on Python floats instead, by the same
active-set methods with exact Cholesky solves (:func:`definite_min_norm`, :func:`definite_dual_cone`):
there numpy's and LAPACK's per-call overhead was most of a step's solver time (issue 12). Anything
else, and anything those solvers give up on, takes the numpy / LAPACK path.

- :func:`min_norm_simplex`: the minimum-norm point of the convex hull of the rows,
  ``min_{w in simplex} w^T G w`` (MGDA; Nash-MTL's stationarity test);
- :func:`project_to_dual_cone`: the projection of ``J^T u`` onto the dual cone
  ``{d : J d >= 0}``, through its dual ``min_{v >= u} v^T G v`` (UPGrad, DualProj).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from operator import mul

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from mtlzoo.errors import NonFiniteGradientError, SolverError

_EPS = float(np.finfo(np.float64).eps)
_NORMAL = float(np.finfo(np.float64).tiny) / _EPS  # below it, products of entries lose digits to underflow
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def to_host(tensor: Tensor) -> np.ndarray:
    """A (small) tensor as a float64 numpy array on the host: a copy, one transfer, one synchronisation."""
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


def check_square(gramian: Tensor) -> None:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"Parameter `gramian` should be a square matrix. Found `gramian.shape = "
                         f"{tuple(gramian.shape)}`.")


def host_gramian(gramian: Tensor, what: str = "the solver") -> np.ndarray:
    """The Gramian as a float64 numpy array on the host, checked square and finite, scaled to unit trace,
    and made positive semi-definite (:func:`clean_gramian` with the input dtype's rounding unit).

    Raises:
        NonFiniteGradientError: The Gramian is not finite (``what`` names the caller in the message).
    """
    check_square(gramian)
    array = to_host(gramian)
    if not np.isfinite(array).all():
        raise NonFiniteGradientError(f"{what}: the Gramian of the task gradients has non-finite entries.")
    return clean_gramian(array, float(torch.finfo(gramian.dtype).eps))


def clean_gramian(array: np.ndarray, eps: float) -> np.ndarray:
    """A finite float64 Gramian scaled to unit trace and made positive semi-definite: eigenvalues within
    ``K eps λ_max`` of 0 (``eps`` the rounding unit of the dtype it was computed in; negative ones included)
    are set to 0, so that rows linearly dependent up to rounding count as such. A zero one stays zero."""
    if array.size == 0:
        return array
    values, vectors = eigh((array + array.T) / 2)
    cutoff = max(float(values[-1]), 0.0) * array.shape[0] * eps
    values = np.where(values > cutoff, values, 0.0)
    total = float(values.sum())
    if total <= 0:
        return np.zeros_like(array)
    array = (vectors * (values / total)) @ vectors.T
    return (array + array.T) / 2


def unit_trace(array: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """A host Gramian divided by its trace (zeros where the trace is not positive), plus ``ridge I``: on the host,
    :func:`mtlzoo.linalg.normalize_gramian` then :func:`mtlzoo.linalg.regularize_gramian`."""
    trace = float(np.trace(array))
    unit = array / trace if trace > 0 else np.zeros_like(array)
    if ridge:
        unit.flat[::unit.shape[0] + 1] += ridge
    return unit


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix: LAPACK's syevd, as ``numpy.linalg.eigh``
    (called directly: a fraction of numpy's per-call overhead on a K x K matrix)."""
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
    """The minimum-norm least-squares solution of a small square system: LAPACK's gelsd (SVD), singular values
    at or below ``cutoff s_max`` counting as 0 (default ``eps K``, numpy's ``rcond=None``). It is
    ``numpy.linalg.lstsq(matrix, rhs, rcond=cutoff)[0]`` (and ``torch.linalg.pinv(matrix, rtol=cutoff) @ rhs``),
    called directly: a fraction of numpy's per-call overhead."""
    size = matrix.shape[0]
    if size == 0:
        return np.zeros(0)
    cutoff = _EPS * size if cutoff is None else cutoff
    work, iwork = _gelsd_workspace(size, size)
    solution, _, _, info = lapack.dgelsd(matrix, rhs, work, iwork, cond=cutoff)
    if info != 0:
        return np.linalg.lstsq(matrix, rhs, rcond=cutoff)[0]  # raises numpy's LinAlgError
    return solution


# ------------------------------------------------------ small positive-definite Gramians, on Python floats
SMALL = 8
"""Up to this many tasks, a Gramian that is safely positive definite (:func:`definite_unit`) is solved on Python
floats by Cholesky factorisations: numpy's and LAPACK's per-call overhead dominates there."""
DEFINITE = 1e-8
"""The smallest eigenvalue :func:`definite_unit` asks of a unit-trace Gramian (at least, and ``64 K eps`` of its
dtype): every principal block then has a condition number below ``1 / DEFINITE``."""


def definite_unit(matrix: np.ndarray, eps: float = 0.0, ridge: float = 0.0) -> list[list[float]] | None:
    """The host Gramian scaled to unit trace (after ``ridge I`` is added to ``G / tr(G)``), as Python floats, where
    its smallest eigenvalue is certainly above ``max(DEFINITE, 64 K eps)`` and K is at most :data:`SMALL`; else
    ``None``.

    The certificate is a Cholesky factorisation of ``G - t I`` (``t`` that bound), which succeeds exactly when
    ``G - t I`` is positive definite, up to a backward error of order ``K eps_64``. Where it holds,
    :func:`clean_gramian` would keep every eigenvalue (it returns this matrix up to rounding), and each
    principal block (Cauchy's interlacing) is non-singular with a condition number below ``1 / DEFINITE``, so
    that :func:`lstsq`'s minimum-norm least-squares solution is the exact solution a Cholesky solve gives.
    ``matrix`` is finite (the callers check).
    """
    size = matrix.shape[0]
    if size == 0 or size > SMALL:
        return None
    rows = matrix.tolist()
    trace = sum(rows[i][i] for i in range(size))
    if not _NORMAL < trace < math.inf:  # a subnormal trace has lost its digits
        return None
    scale = 1.0 / (trace * (1.0 + size * ridge))
    unit = [[(rows[i][j] + rows[j][i]) * 0.5 * scale for j in range(size)] for i in range(size)]
    if ridge:
        for i in range(size):
            unit[i][i] += ridge / (1.0 + size * ridge)
    if cholesky(unit, max(DEFINITE, 64 * size * eps)) is None:
        return None
    return unit


def cholesky(matrix: list[list[float]], shift: float = 0.0) -> list[list[float]] | None:
    """The lower Cholesky factor of ``matrix - shift I`` (Python floats), ``None`` at a pivot that is not positive."""
    size = len(matrix)
    factor = [[0.0] * size for _ in range(size)]
    for i in range(size):
        row = factor[i]
        source = matrix[i]
        for j in range(i):
            other = factor[j]
            row[j] = (source[j] - sum(map(mul, row[:j], other[:j]))) / other[j]
        pivot = source[i] - shift - sum(map(mul, row[:i], row[:i]))
        if not pivot > 0:
            return None
        row[i] = math.sqrt(pivot)
    return factor


def cholesky_solve(factor: list[list[float]], rhs: list[float]) -> list[float]:
    """``x`` with ``L L^T x = rhs``, ``L`` from :func:`cholesky`."""
    size = len(factor)
    forward = [0.0] * size
    for i in range(size):
        row = factor[i]
        forward[i] = (rhs[i] - sum(map(mul, row[:i], forward[:i]))) / row[i]
    solution = [0.0] * size
    for i in range(size - 1, -1, -1):
        solution[i] = (forward[i] - sum(factor[k][i] * solution[k] for k in range(i + 1, size))) / factor[i][i]
    return solution


def _solve_definite(hessian: list[list[float]], index: list[int], linear: list[float]) -> list[float] | None:
    """``x`` with ``H[index, index] x = f[index]`` for a positive definite H (Python floats): a division, Cramer's rule
    on 2 x 2, a Cholesky factorisation above; ``None`` at a pivot that is not positive (rounding only)."""
    if len(index) == 1:
        i = index[0]
        pivot = hessian[i][i]
        return [linear[i] / pivot] if pivot > 0 else None
    if len(index) == 2:
        i, j = index
        a, b, d = hessian[i][i], hessian[i][j], hessian[j][j]
        determinant = a * d - b * b
        if not (a > 0 and determinant > 0):
            return None
        return [(d * linear[i] - b * linear[j]) / determinant, (a * linear[j] - b * linear[i]) / determinant]
    factor = cholesky([[hessian[i][j] for j in index] for i in index])
    return None if factor is None else cholesky_solve(factor, [linear[i] for i in index])



def blocking_step(current: list[float], support: list[int], target: list[float]) -> tuple[float, int]:
    """An active-set move from ``current`` towards ``target`` (on the coordinates ``support``): the
    fraction of the way at which the first coordinate reaches 0, and its position in ``support``
    (``inf`` and -1 when no target coordinate is <= 0)."""
    step, blocking = math.inf, -1
    for position, (i, value) in enumerate(zip(support, target)):
        if value <= 0:
            drop = current[i] - value
            ratio = current[i] / drop if drop > 0 else 0.0
            if ratio < step:
                step, blocking = ratio, position
    return step, blocking


def _definite_nonnegative_quadratic(hessian: list[list[float]], linear: list[float], start: list[int],
                                    scale: float) -> list[float] | None:
    r""":func:`_nonnegative_quadratic` for a positive definite H on Python floats (``argmin_{x >= 0} 1/2 x^T H x -
    f^T x``, unique), Lawson and Hanson's method with exact solves (:func:`_solve_definite`) on the passive sets.
    ``scale`` is ``max |H_ij|`` (the tolerance is 1e-12 of it or of ``max |f_i|``, as there).

    It starts from the minimiser on the passive set ``start`` where that minimiser is positive (a valid state of
    the method: the objective only decreases from there), else from 0. ``None`` where a block's factorisation
    fails or the method does not converge (rounding only): the caller then takes the numpy path.
    """
    size = len(linear)
    x = [0.0] * size
    passive = [False] * size
    tolerance = 1e-12 * max(scale, max(map(abs, linear)), _EPS)
    if start:
        target = _solve_definite(hessian, start, linear)
        if target is None:
            return None
        if min(target) > 0:
            for i, value in zip(start, target):
                x[i], passive[i] = value, True
    for _ in range(10 * size + 50):
        best, candidate = tolerance, -1
        for i in range(size):
            if not passive[i]:
                gradient = linear[i] - sum(map(mul, hessian[i], x))
                if gradient > best:
                    best, candidate = gradient, i
        if candidate < 0:
            return x
        passive[candidate] = True
        for _ in range(size + 1):
            index = [i for i in range(size) if passive[i]]
            target = _solve_definite(hessian, index, linear)
            if target is None:
                return None
            if min(target) > 0:
                x = [0.0] * size
                for i, value in zip(index, target):
                    x[i] = value
                break
            # Move towards the target until the first coordinate reaches 0 (the blocking one), drop it.
            step, blocking = blocking_step(x, index, target)
            moved = [x[i] + step * (value - x[i]) for i, value in zip(index, target)]
            moved[blocking] = 0.0
            x = [0.0] * size
            for i, value in zip(index, moved):
                if value > 0:
                    x[i] = value
                else:
                    passive[i] = False
            if not any(passive):
                break
    return None


def _largest_entry(unit: list[list[float]]) -> float:
    return max(max(map(abs, row)) for row in unit)


def definite_min_norm(unit: list[list[float]]) -> list[float] | None:
    """:func:`min_norm_weights` on a Gramian certified by :func:`definite_unit`: ``w = x / 1^T x`` with
    ``x = argmin_{x >= 0} 1/2 x^T G x - 1^T x`` (the two problems' optimality conditions coincide, with
    ``x = w / w^T G w``), started from ``G^{-1} 1`` (all tasks passive: optimal where it is positive, the
    common case). ``None`` where the exact solver gives up (then take :func:`min_norm_weights`)."""
    size = len(unit)
    x = _definite_nonnegative_quadratic(unit, [1.0] * size, list(range(size)), _largest_entry(unit))
    if x is None:
        return None
    total = sum(x)
    return [value / total for value in x] if total > 0 else None


def definite_dual_cone(targets: list[list[float]], unit: list[list[float]]) -> list[list[float]] | None:
    """:func:`dual_cone_weights` on a Gramian certified by :func:`definite_unit` (one solution per row of
    ``targets``), each problem started from the tasks its target conflicts with. ``None`` where the exact solver
    gives up (then take :func:`dual_cone_weights`)."""
    size = len(unit)
    scale = max(_largest_entry(unit), _EPS)
    solutions = []
    for target in targets:
        linear = [0.0] * size  # -G u (G symmetric: a combination of its rows)
        for i, value in enumerate(target):
            if value:
                linear = [total - value * entry for total, entry in zip(linear, unit[i])]
        solution = list(target)
        if max(linear) > 1e-12 * max(max(map(abs, linear)), scale):
            x = _definite_nonnegative_quadratic(unit, linear, [i for i in range(size) if linear[i] > 0], scale)
            if x is None:
                return None
            solution = [value + step for value, step in zip(solution, x)]
        solutions.append(solution)
    return solutions


def min_norm_simplex(gramian: Tensor) -> Tensor:
    r"""Weights ``w`` of the minimum-norm point of the convex hull of the rows: ``min_{w >= 0, 1^T w = 1} w^T G w``.

    Wolfe's algorithm ("Finding the nearest point in a polytope", Math. Programming 1976) on the
    Gramian: a corral of affinely independent rows grows by the row that most decreases the
    norm and shrinks along the segment to its affine minimiser until that minimiser lies in
    the hull. It stops when no row ``p_j`` satisfies ``x . p_j < ||x||^2`` (up to rounding), which
    is the optimality condition, so the point ``x = J^T w`` is exact. It is unique; ``w`` is
    unique when the rows are affinely independent, and otherwise one of the optimal weightings.

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
    """:func:`min_norm_simplex` on a host Gramian already made by :func:`host_gramian` (or :func:`clean_gramian`):
    on Python floats where :func:`definite_unit` certifies it (:func:`definite_min_norm`), else Wolfe's algorithm."""
    size = matrix.shape[0]
    weights = np.zeros(size)
    if size == 0:
        return weights
    unit = definite_unit(matrix)
    if unit is not None and (fast := definite_min_norm(unit)) is not None:
        return np.array(fast)
    diagonal = np.diag(matrix)
    start = int(diagonal.argmin())
    corral = [start]
    weights[start] = 1.0
    tolerance = 1e-12 * max(float(diagonal.max()), _EPS)
    bordered = np.ones((size + 1, size + 1))  # the affine minimiser's system on a corral S is bordered[S + [K]]
    bordered[:size, :size] = matrix
    bordered[size, size] = 0.0
    for _ in range(50 * size + 100):
        products = matrix @ weights
        norm = float(weights @ products)
        candidate = int(products.argmin())
        if products[candidate] >= norm - tolerance or candidate in corral:
            break
        corral.append(candidate)
        if not _minor_cycle(bordered, weights, corral):
            break  # the new row is affinely dependent on the corral up to rounding: optimal
    else:
        raise SolverError(f"min_norm_simplex did not converge on a {size} x {size} Gramian.")
    weights = np.clip(weights, 0.0, None)
    weights /= weights.sum()
    return weights


def _minor_cycle(bordered: np.ndarray, weights: np.ndarray, corral: list[int]) -> bool:
    """Wolfe's minor cycle, in place: move ``weights`` towards the corral's affine minimiser, dropping
    the rows whose weight reaches 0, until that minimiser lies in the corral's hull. ``bordered`` is
    the Gramian bordered by ones (and 0 in the corner): ``[[G, 1], [1^T, 0]]``.

    Returns ``False`` (and drops the row just added) when that row cannot enter: rounding only.
    """
    size = weights.shape[0]
    while True:
        count = len(corral)
        index = np.array([*corral, size])
        rhs = np.zeros(count + 1)
        rhs[count] = 1.0
        affine = lstsq(bordered[index[:, None], index], rhs)[:count]
        if affine.min() > _EPS:
            weights[:] = 0.0
            weights[index[:count]] = affine
            return True
        current = weights[index[:count]]
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
        weights[index[:count][keep]] = moved[keep]
        corral[:] = [row for row, kept in zip(corral, keep.tolist()) if kept]
        if len(corral) == 1:
            weights[corral] = 1.0
            return True


def _nonnegative_quadratic(hessian: np.ndarray, linear: np.ndarray) -> np.ndarray:
    r"""``argmin_{x >= 0} 1/2 x^T H x - f^T x`` for a positive semi-definite H, by Lawson and Hanson's
    active-set method on the normal equations (``H = A^T A``, ``f = A^T b``: non-negative least squares).

    Each inner step moves from the current point by the minimum-norm step to the minimiser on
    the passive set, so a newly freed coordinate always grows, also when H is singular.
    """
    size = hessian.shape[0]
    x = np.zeros(size)
    passive = np.zeros(size, dtype=bool)
    scale = max(float(np.abs(hessian).max(initial=0.0)), float(np.abs(linear).max(initial=0.0)), _EPS)
    tolerance = 1e-12 * scale
    for _ in range(10 * size + 50):
        gradient = linear - hessian @ x
        free = np.where(passive, -np.inf, gradient)
        candidate = int(free.argmax())
        if free[candidate] <= tolerance:  # also when every coordinate is passive (free is all -inf)
            return x
        passive[candidate] = True
        for _ in range(size + 1):
            index = np.flatnonzero(passive)
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


def project_to_dual_cone(weights: Tensor, gramian: Tensor) -> Tensor:
    r"""Weights ``v`` with ``J^T v`` the projection of ``J^T u`` onto the dual cone ``{d : J d >= 0}``.

    By duality (Quinton & Rey, "Jacobian descent for multi-objective optimization", Prop. 1),
    ``v = argmin_{v >= u} v^T G v``: with ``x = v - u >= 0`` a non-negative quadratic problem,
    solved exactly by an active-set method (Lawson and Hanson's). The projection ``J^T v`` is
    unique; ``v`` is unique when ``G`` is non-singular. At the solution ``G v >= 0`` (``J^T v``
    conflicts with no row) with equality wherever ``v_k > u_k``.

    Args:
        weights: ``u``, shape ``(..., K)``: one problem per vector (UPGrad projects every ``e_k / K``).
        gramian: ``G = J J^T``, K x K, symmetric positive semi-definite.

    Returns:
        ``v``, shaped like ``weights``, in the Gramian's dtype and device.

    Raises:
        NonFiniteGradientError: The Gramian is not finite.
        SolverError: The active-set method did not converge (not observed; rounding only).
    """
    check_square(gramian)
    if weights.shape[-1:] != gramian.shape[:1]:
        raise ValueError(f"Parameter `weights` should end with the Gramian's size {gramian.shape[0]}. Found "
                         f"`weights.shape = {tuple(weights.shape)}`.")
    matrix = host_gramian(gramian, "project_to_dual_cone")
    solutions = dual_cone_weights(to_host(weights).reshape(-1, matrix.shape[0]), matrix)
    return from_host(solutions.reshape(weights.shape), gramian)


def dual_cone_weights(targets: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """:func:`project_to_dual_cone` on the host: one solution per row of ``targets`` (N x K), for a Gramian made by
    :func:`host_gramian` (or :func:`clean_gramian`); on Python floats where :func:`definite_unit` certifies it
    (:func:`definite_dual_cone`), else by :func:`_nonnegative_quadratic`. The solutions do not depend on the
    Gramian's scale, so the unit-trace one is solved on."""
    solutions = targets.copy()
    if not targets.shape[0]:
        return solutions
    unit = definite_unit(matrix)
    if unit is not None and (fast := definite_dual_cone(targets.tolist(), unit)) is not None:
        return np.array(fast).reshape(targets.shape)
    linear = -(targets @ matrix)  # row r: -G u_r, the linear term of problem r
    # Lawson-Hanson's first test, for all the problems at once: where no coordinate of -G u is above the
    # tolerance, x = 0 is optimal (J^T u is already in the cone) and v = u.
    scale = np.maximum(np.abs(linear).max(axis=1), max(float(np.abs(matrix).max(initial=0.0)), _EPS))
    for row in np.flatnonzero(linear.max(axis=1) > 1e-12 * scale):
        solutions[row] += _nonnegative_quadratic(matrix, linear[row])
    return solutions
