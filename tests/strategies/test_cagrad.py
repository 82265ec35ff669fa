"""CAGrad (Liu et al., NeurIPS 2021): the conflict-averse update, the authors' rescaling, degenerate input.

References: the paper's problem (max_d min_k g_k . d within ||d - g_0|| <= c ||g_0||, its dual in w) checked
through its optimality: the update lies on the ball and beats every other point of the ball on the worst
task (sampled); the authors' code (Cranial-XIX/CAGrad, ``cagrad(..., rescale)`` and ``overwrite_grad``)
for the rescaling and the factor K.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.errors import SolverWarning
from mtlzoo.strategies import cagrad as module

MATRIX = torch.tensor([[3.0, 0.0, 1.0], [-2.0, 1.0, 0.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
ONES = torch.ones(3, dtype=torch.float64)


def direction(matrix: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad's d, without the authors' rescaling and factor K."""
    strategy = mtlzoo.create("cagrad", num_tasks=matrix.shape[0], c=c, rescale=0)
    return strategy.aggregate(matrix, torch.ones(matrix.shape[0], dtype=matrix.dtype)) / matrix.shape[0]


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_the_update_is_the_best_worst_case_point_of_the_ball(c: float) -> None:
    """d is on the sphere ||d - g_0|| = c ||g_0|| and no sampled point of the ball does better on its worst task."""
    d = direction(MATRIX, c)
    mean = MATRIX.mean(0)
    radius = c * float(mean.norm())
    assert float((d - mean).norm()) == pytest.approx(radius, rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(20_000, 3, generator=generator, dtype=torch.float64)
    points = mean + radius * offsets / offsets.norm(dim=1, keepdim=True) * torch.rand(20_000, 1, generator=generator,
                                                                                     dtype=torch.float64) ** (1 / 3)
    assert float((MATRIX @ d).min()) >= float((points @ MATRIX.T).min(dim=1).values.max()) - 1e-9


def test_c_zero_is_the_sum_and_the_rescalings_follow_the_authors() -> None:
    """c = 0: g_0 times K, the plain sum (ls). rescale 1 divides d by 1 + c^2, 2 by 1 + c, 0 not at all."""
    torch.testing.assert_close(mtlzoo.create("cagrad", num_tasks=3, c=0.0).aggregate(MATRIX, ONES), MATRIX.sum(0))
    d = 3 * direction(MATRIX, 0.5)
    for rescale, divisor in ((0, 1.0), (1, 1.25), (2, 1.5)):
        update = mtlzoo.create("cagrad", num_tasks=3, c=0.5, rescale=rescale).aggregate(MATRIX, ONES)
        torch.testing.assert_close(update, d / divisor)
    for name, value in (("c", -0.1), ("rescale", 3)):
        with pytest.raises(ValueError, match=f"Parameter `{name}`"):
            mtlzoo.create("cagrad", num_tasks=2, **{name: value})


def test_degenerate_problems_give_the_mean_gradient() -> None:
    """A zero row or 0 in the hull make g_w = 0 optimal: the update tends to g_0 (the authors' code gives g_0;
    torchjd 0.18 gives 0). One task: d = (1 + c) g."""
    zero_row = MATRIX.clone()
    zero_row[1] = 0
    torch.testing.assert_close(direction(zero_row, 0.4), zero_row.mean(0), rtol=1e-3, atol=1e-3)
    opposite = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.0, 1.0]], dtype=torch.float64)
    assert bool(torch.isfinite(direction(opposite, 0.4)).all())
    single = MATRIX[:1]
    torch.testing.assert_close(direction(single, 0.4), 1.4 * single[0])


def test_a_solve_out_of_budget_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback: an active-set method that runs out of steps says so, and its last iterate is used."""
    monkeypatch.setattr(module, "ITERATIONS_PER_TASK", 1)
    with pytest.warns(SolverWarning, match="did not converge in 3 steps"):
        update = mtlzoo.create("cagrad", num_tasks=3).aggregate(MATRIX, ONES)
    assert bool(torch.isfinite(update).all())


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_the_inner_problem_matches_slsqp_the_authors_solver(rank: int) -> None:
    """The authors solve min_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w|| with scipy's SLSQP; on random unit-trace
    Gramians (K = 2..8, full rank and rank-deficient, interior and boundary optima) the active-set method's
    objective is never above SLSQP's (run to ftol 1e-15) by more than rounding, and the optimality conditions
    hold: equal partial derivatives on the support, none lower off it (to 1e-8 of their size)."""
    from scipy.optimize import minimize
    rng = np.random.default_rng(rank)
    boundary = 0
    for trial in range(60):
        size = int(rng.integers(2, 9))
        factor = rng.standard_normal((size, min(rank, size)))
        factor[1:] -= 2 * rng.random((size - 1, 1)) * factor[0] * (trial % 2)
        gramian = factor @ factor.T
        gramian /= np.trace(gramian)
        c = float(rng.choice([0.2, 0.4, 0.9]))
        radius = c * np.sqrt(max(gramian.mean(), 0.0))

        def objective(w: np.ndarray, gramian: np.ndarray = gramian, radius: float = radius) -> float:
            return float(gramian.mean(1) @ w + radius * np.sqrt(max(w @ gramian @ w, 0.0) + module.SMOOTHING))

        ours = module.conflict_averse_weights(gramian, c)
        reference = minimize(objective, np.full(size, 1 / size), method="SLSQP", bounds=[(0, 1)] * size,
                             constraints={"type": "eq", "fun": lambda w: w.sum() - 1}, options={"ftol": 1e-15})
        assert abs(ours.sum() - 1) < 1e-12 and ours.min() >= 0
        assert objective(ours) <= objective(reference.x) + 1e-12
        products = gramian @ ours
        gradient = gramian.mean(1) + radius * products / np.sqrt(ours @ products + module.SMOOTHING)
        support = ours > 0
        level = gradient[support].mean()
        # to 1e-6 of the terms' size: the smoothed norm's curvature (up to 1 / sqrt(1e-8)) blurs the derivatives
        # that much where g_w nearly vanishes; elsewhere they agree to about 1e-10
        scale = np.abs(gramian.mean(1)).max() + radius * np.abs(products).max() / np.sqrt(ours @ products)
        assert np.ptp(gradient[support]) <= 1e-6 * scale
        assert (gradient[~support] >= level - 1e-6 * scale).all()
        boundary += int((~support).any())
    assert boundary >= 10
