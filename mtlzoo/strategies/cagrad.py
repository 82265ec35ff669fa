r"""CAGrad (Liu et al., NeurIPS 2021): the best worst-case improvement near the average gradient."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize

from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import clean_gramian, lstsq
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_number

RESCALES = (0, 1, 2)
SMOOTHING = 1e-8
"""Added to ``||g_w||^2`` on the unit-trace Gramian (the authors' objective adds 1e-8 on the raw one): the norm is
smooth at ``g_w = 0`` and the update continuous there."""


def conflict_averse_weights(gramian: np.ndarray, c: float) -> np.ndarray:
    r"""``w = argmin_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||`` on a unit-trace float64 Gramian.

    The official code's problem, solved as it does by SLSQP (scipy), here with the exact gradient
    and ``ftol=1e-12``, then polished by Newton steps on its active face (:func:`_polish`), unless
    Newton steps from the simplex's centre already reach the (convex) problem's interior minimiser
    (:func:`_interior_optimum`). ``||g_w||`` is smoothed by :data:`SMOOTHING`. A solver that stops
    early gives a :class:`~mtlzoo.errors.SolverWarning` and its last iterate, put back on the simplex.
    """
    size = gramian.shape[0]
    mean_products = gramian.mean(axis=1)  # g_k . g_0
    radius = c * math.sqrt(max(float(gramian.mean()), 0.0))  # c ||g_0||
    interior = _interior_optimum(gramian, mean_products, radius)
    if interior is not None:
        return interior

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        products = gramian @ w
        norm = math.sqrt(max(float(w @ products), 0.0) + SMOOTHING)
        return float(mean_products @ w + radius * norm), mean_products + radius * products / norm

    start = np.full(size, 1.0 / size)
    result = minimize(objective, start, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * size,
                      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones_like(w)}],
                      options={"ftol": 1e-12, "maxiter": 500})
    weights = np.clip(result.x, 0.0, None)
    weights = weights / weights.sum() if weights.sum() > 0 else start
    if not result.success:
        warnings.warn(f"CAGrad: SLSQP stopped without converging ({result.message}); its last iterate is used.",
                      SolverWarning, stacklevel=4)
        return weights
    return _polish(weights, gramian, mean_products, radius)


def _interior_optimum(gramian: np.ndarray, linear: np.ndarray, radius: float) -> np.ndarray | None:
    """The minimiser when it lies inside the simplex, by :func:`_polish` from the centre; ``None`` where that ends
    off the optimality conditions (all weights above 1e-9, partial derivatives equal to 1e-10 of their size)."""
    size = gramian.shape[0]
    if size < 2:
        return None
    weights = _polish(np.full(size, 1.0 / size), gramian, linear, radius)
    if weights.min() <= 1e-9:
        return None
    products = gramian @ weights
    gradient = linear + radius * products / math.sqrt(max(float(weights @ products), 0.0) + SMOOTHING)
    spread = float(gradient.max() - gradient.min())
    return weights if spread <= 1e-10 * max(float(np.abs(gradient).max()), 1e-300) else None


def _polish(weights: np.ndarray, gramian: np.ndarray, linear: np.ndarray, radius: float) -> np.ndarray:
    """Newton steps on SLSQP's active face (zero weights held at 0, the sum at 1), to rounding: SLSQP's ``ftol``
    leaves the weights right to about its square root. A step that would leave the simplex or raise the objective
    ends the polishing."""
    support = np.flatnonzero(weights > 1e-9)

    def value(w: np.ndarray) -> float:
        return float(linear @ w + radius * math.sqrt(max(float(w @ gramian @ w), 0.0) + SMOOTHING))

    current = value(weights)
    for _ in range(30):
        products = gramian @ weights
        norm = math.sqrt(max(float(weights @ products), 0.0) + SMOOTHING)
        gradient = linear + radius * products / norm
        hessian = radius * (gramian / norm - np.outer(products, products) / norm**3)
        count = support.size
        system = np.ones((count + 1, count + 1))
        system[:count, :count] = hessian[support[:, None], support]
        system[count, count] = 0.0
        rhs = np.zeros(count + 1)
        rhs[:count] = -gradient[support]
        step = lstsq(system, rhs)[:count]  # numpy.linalg.lstsq(system, rhs, rcond=None), called directly
        candidate = weights.copy()
        candidate[support] += step
        if (candidate[support] <= 0).any():
            break
        candidate /= candidate.sum()
        new = value(candidate)
        if new > current + 1e-15 * max(abs(current), 1.0):
            break
        weights, current = candidate, new
        if np.abs(step).max() <= 1e-15:
            break
    return weights

class CAGrad(GramianAggregator):
    r"""CAGrad: maximise the worst task's improvement within a ball around the average gradient.

    Paper: Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021
    (https://arxiv.org/abs/2110.14048), Algorithm 1. With ``g_0`` the mean gradient:

    .. math::

        \max_d \min_k g_k \cdot d \ \text{ s.t. } \|d - g_0\| \le c\|g_0\|
        \ \Longrightarrow\ d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w,\quad
        w = \arg\min_{w \in \Delta} g_w \cdot g_0 + c\|g_0\|\|g_w\| .

    As in the authors' code (``cagrad(grads, alpha=c, rescale=1)`` and its ``overwrite_grad``),
    the update is then divided by ``1 + c^2`` (``rescale=1``; ``2`` divides by ``1 + c``, ``0``
    keeps ``d``) and multiplied by K "to match the sum loss": with ``c = 0`` CAGrad is ``ls``.
    The inner problem is solved on the unit-trace Gramian, as the authors do, by SLSQP (here with
    the exact gradient and ``ftol=1e-12``, then Newton steps on its active face to rounding; if
    SLSQP stops early, a :class:`~mtlzoo.errors.SolverWarning` says so and its last iterate is
    used), skipped where Newton steps from the simplex's centre already satisfy the optimality
    conditions (an interior optimum). ``||g_w||`` is smoothed to ``sqrt(||g_w||^2 + δ)`` (``δ`` =
    1e-8 of ``||J||_F^2``) in the problem, as the authors' objective (theirs adds 1e-8 in raw units),
    and in ``d``, where the authors divide by ``||g_w|| + 1e-8`` (raw units): the two agree unless
    ``||g_w||`` is within a few orders of 1e-4 of ``||J||_F``, and there this update stays
    continuous and independent of the gradients' scale, tending to ``g_0`` where ``g_w`` vanishes.

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
