r"""CAGrad (Liu et al., NeurIPS 2021): the best worst-case improvement near the average gradient."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import clean_gramian, lstsq
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_number

RESCALES = (0, 1, 2)
SMOOTHING = 1e-8
"""Added to ``||g_w||^2`` on the unit-trace Gramian (the authors' objective adds 1e-8 on the raw one): the norm is
smooth at ``g_w = 0`` and the update continuous there."""
ITERATIONS_PER_TASK = 30
"""The active-set method's budget: this many Newton or face changes per task (it needs a few in all)."""


def conflict_averse_weights(gramian: np.ndarray, c: float) -> np.ndarray:
    r"""``w = argmin_{w in simplex} f(w) = g_w . g_0 + c ||g_0|| ||g_w||`` on a unit-trace float64 Gramian.

    The official code's problem (which it solves by SLSQP), solved exactly by an active-set Newton method on the faces
    of the simplex: Newton steps (the projected gradient where the Hessian gives no descent) on the current face with a
    backtracking line search, dropping a weight that reaches 0; at the face's minimiser, the weight whose partial
    derivative is lowest below the face's common value joins the face, until none is (the optimality conditions of the
    convex problem, to 1e-10 of the size of the gradient's terms). ``||g_w||`` is smoothed by :data:`SMOOTHING`. A solve
    that runs out of its budget (not observed) gives a :class:`~mtlzoo.errors.SolverWarning` and its last iterate.
    """
    size = gramian.shape[0]
    linear = gramian.mean(axis=1)  # g_k . g_0
    radius = c * math.sqrt(max(float(gramian.mean()), 0.0))  # c ||g_0||

    def value(w: np.ndarray) -> float:
        return float(linear @ w + radius * math.sqrt(max(float(w @ gramian @ w), 0.0) + SMOOTHING))

    resolution = 1e-15 * (float(np.abs(linear).max()) + radius * math.sqrt(float(np.abs(gramian).max()) + SMOOTHING))
    weights = np.full(size, 1.0 / size)
    face = np.ones(size, dtype=bool)
    for _ in range(ITERATIONS_PER_TASK * size):
        products = gramian @ weights
        norm = math.sqrt(max(float(weights @ products), 0.0) + SMOOTHING)
        gradient = linear + radius * products / norm
        tolerance = 1e-10 * max(float(np.abs(linear).max() + radius * np.abs(products).max() / norm), 1e-300)
        index = np.flatnonzero(face)
        moved = None
        if float(np.ptp(gradient[index])) > tolerance:
            hessian = radius * (gramian / norm - np.outer(products, products) / norm**3)
            moved = _face_step(weights, index, gradient, hessian[index[:, None], index], value, resolution)
        if moved is None:  # the face's minimiser: does a weight at 0 lower f?
            outside = np.where(face, np.inf, gradient - float(gradient[index].mean()))
            entering = int(outside.argmin())
            if outside[entering] >= -tolerance - float(np.ptp(gradient[index])):
                return weights
            face[entering] = True
            continue
        weights, blocking = moved
        if blocking is not None:
            face[blocking] = False
    warnings.warn(f"CAGrad: the active-set method did not converge in {ITERATIONS_PER_TASK * size} steps; its last "
                  "iterate is used.", SolverWarning, stacklevel=4)
    return weights


def _face_step(weights: np.ndarray, index: np.ndarray, gradient: np.ndarray, hessian: np.ndarray,
               value: Callable[[np.ndarray], float], resolution: float) -> tuple[np.ndarray, int | None] | None:
    """One step on the face ``index`` (weights elsewhere 0, their sum 1): Newton's (the minimum-norm solution of
    the bordered system, the Hessian may be singular), or the projected gradient where that is no descent,
    cut where a weight reaches 0 (returned as the blocking index) and halved until ``f`` decreases (Armijo) by more
    than its rounding (``resolution``). ``None`` when no step does: the face's minimiser up to rounding."""
    count = index.size
    system = np.ones((count + 1, count + 1))
    system[:count, :count] = hessian
    system[count, count] = 0.0
    rhs = np.zeros(count + 1)
    rhs[:count] = -gradient[index]
    step = lstsq(system, rhs)[:count]
    if float(np.abs(step).max()) <= 1e-15:
        return None
    slope = float(gradient[index] @ step)
    if not slope < 0:
        step = float(gradient[index].mean()) - gradient[index]
        slope = float(gradient[index] @ step)
    if not slope < -resolution:  # no step can lower f beyond its rounding
        return None
    falling = step < 0
    ratios = np.where(falling, weights[index] / np.where(falling, -step, 1.0), np.inf)
    blocking = int(ratios.argmin())
    size = min(1.0, float(ratios[blocking]))
    current = value(weights)
    while size > 1e-16:
        candidate = weights.copy()
        candidate[index] += size * step
        if size == ratios[blocking]:
            candidate[index[blocking]] = 0.0
        candidate = np.clip(candidate, 0.0, None)
        candidate /= candidate.sum()
        if value(candidate) <= min(current + 1e-4 * size * slope, current - resolution):
            return candidate, (int(index[blocking]) if size == ratios[blocking] else None)
        size /= 2
    return None


class CAGrad(GramianAggregator):
    r"""CAGrad: maximise the worst task's improvement within a ball around the average gradient.

    Paper: Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021
    (https://arxiv.org/abs/2110.14048), Algorithm 1. With ``g_0`` the mean gradient:

    .. math::

        \max_d \min_k g_k \cdot d \ \text{ s.t. } \|d - g_0\| \le c\|g_0\|
        \ \Longrightarrow\ d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w,\quad
        w = \arg\min_{w \in \Delta} g_w \cdot g_0 + c\|g_0\|\|g_w\| .

    As in the authors' code (``cagrad(grads, alpha=c, rescale=1)`` and its ``overwrite_grad``), the update is then
    divided by ``1 + c^2`` (``rescale=1``; ``2`` divides by ``1 + c``, ``0`` keeps ``d``) and multiplied by K "to match
    the sum loss": with ``c = 0`` CAGrad is ``ls``. The inner problem is solved on the unit-trace Gramian, as the
    authors do; they use SLSQP, which stops within its ``ftol``, and here an active-set Newton method finds the same
    (convex) problem's minimiser to rounding (:func:`conflict_averse_weights`). ``||g_w||`` is smoothed to
    ``sqrt(||g_w||^2 + δ)`` (``δ`` = 1e-8 of ``||J||_F^2``) in the problem, as the authors' objective (theirs adds 1e-8
    in raw units), and in ``d``, where the authors divide by ``||g_w|| + 1e-8`` (raw units): the two agree unless
    ``||g_w||`` is within a few orders of 1e-4 of ``||J||_F``, and there this update stays continuous and independent of
    the gradients' scale, tending to ``g_0`` where ``g_w`` vanishes.

    Differences from torchjd 0.18's ``CAGrad``: torchjd returns ``d`` itself (its update is this
    one times ``(1 + c^2) / K``), solves the inner problem with Clarabel, and returns zero when
    ``||g_w|| < 1e-4`` on its normalised Gramian or when the Gramian's trace is below 1e-4.

    Args:
        c: Radius of the ball, as a fraction of ``||g_0||`` (the paper's ``c``; its experiments use
            0.4 on NYUv2 and CityScapes, the default here, and 0.9 in multi-task RL).
        rescale: 0, 1 or 2 (see above): the authors' constant factor of their update, tied to ``c``.

    Example:
        >>> import torch, mtlzoo
        >>> cagrad = mtlzoo.create("cagrad", num_tasks=2, c=0.0)
        >>> cagrad.aggregate(torch.tensor([[1.0, 0.0], [-0.5, 1.0]]), torch.ones(2))
        tensor([0.5000, 1.0000])
    """

    info = StrategyInfo(
        name="cagrad",
        summary="Best worst-case task improvement within a ball around the average gradient (conflict-averse).",
        request=Request("parameters", "gramian"),
        paper=Paper(
            authors=("Bo Liu", "Xingchao Liu", "Xiaojie Jin", "Peter Stone", "Qiang Liu"),
            title="Conflict-Averse Gradient Descent for Multi-task Learning", venue="NeurIPS", year=2021,
            url="https://arxiv.org/abs/2110.14048"),
        properties=frozenset({"permutation_invariant", "scale_linear"}), cost="parameters",
        original_code="https://github.com/Cranial-XIX/CAGrad",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None, c: float = 0.4, rescale: int = 1) -> None:
        super().__init__(num_tasks, target=target)
        if rescale not in RESCALES or isinstance(rescale, bool):
            raise ValueError(f"Parameter `rescale` should be one of {RESCALES}. Found `rescale = {rescale!r}`.")
        self.c = check_number("c", c)
        self.rescale = rescale

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        size = gramian.shape[0]
        divisor = {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]
        unit = clean_gramian(gramian, step.eps)
        weights = np.full(size, 1.0 / size)
        radius = self.c * math.sqrt(max(float(unit.mean()), 0.0))
        if radius > 0 and size > 1:
            w = conflict_averse_weights(unit, self.c)
            weights = weights + radius / math.sqrt(max(float(w @ unit @ w), 0.0) + SMOOTHING) * w
        elif radius > 0:
            weights = weights * (1 + self.c)
        return size * weights / divisor
