"""FairGrad (Ban & Ji, ICML 2024): the update that allocates the tasks' improvements alpha-fairly."""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.errors import SolverWarning
from mtlzoo.strategies.nash_mtl import NashBargaining


def rows(kind: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    if kind == "conflicting":
        matrix[1:] -= 0.9 * matrix[0]
    elif kind == "scaled":
        matrix *= torch.logspace(-3, 3, 4, dtype=torch.float64).unsqueeze(1)
    return matrix


def weights_of(matrix: torch.Tensor, **options: object) -> torch.Tensor:
    """w (without the factor K) for the rows of ``matrix``."""
    size = matrix.shape[0]
    strategy = mtlzoo.create("fairgrad", num_tasks=size, max_norm=0.0, **options)
    return strategy.inner.gramian_weights(matrix @ matrix.T, torch.ones(size, dtype=matrix.dtype)) / size


@pytest.mark.parametrize("kind", ["generic", "conflicting", "scaled"])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0, 5.0, 20.0])
def test_the_weights_solve_the_papers_equations(alpha: float, kind: str) -> None:
    """(G w)_k = w_k^(-1/alpha) with w > 0 (eq. 4), to 1e-9 relative, also with rows from 1e-3 to 1e3 in size; so
    every task improves along d: g_k . d = K w_k^(-1/alpha) > 0 (no conflict)."""
    matrix = rows(kind)
    weights = weights_of(matrix, alpha=alpha)
    target = weights ** (-1 / alpha)
    assert bool((weights > 0).all())
    torch.testing.assert_close(matrix @ matrix.T @ weights, target, rtol=1e-9, atol=0)
    update = mtlzoo.create("fairgrad", num_tasks=4, alpha=alpha, max_norm=0.0).aggregate(matrix, torch.ones(4))
    torch.testing.assert_close(matrix @ update, 4 * target, rtol=1e-8, atol=0)


def test_alpha_one_is_nash_bargaining() -> None:
    """alpha = 1: w_k (G w)_k = 1, Nash-MTL's bargaining solution (mtlzoo's NashBargaining, checked against torchjd):
    the same weights to 1e-10, times the authors' K."""
    matrix = rows("conflicting", seed=1)
    nash = NashBargaining(4).gramian_weights(matrix @ matrix.T, torch.ones(4, dtype=matrix.dtype))
    torch.testing.assert_close(weights_of(matrix, alpha=1.0), nash, rtol=1e-10, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 3.0])
def test_the_weights_scale_as_the_equations_say(alpha: float) -> None:
    """G -> s G scales the solution by s^(-alpha / (alpha + 1)) (what the solver's scale-back assumes), s = 1e4."""
    matrix = rows("generic", seed=2)
    torch.testing.assert_close(weights_of(100 * matrix, alpha=alpha),
                               weights_of(matrix, alpha=alpha) * 1e4 ** (-alpha / (alpha + 1)), rtol=1e-10, atol=0)


def test_the_authors_clip_the_update_to_norm_one() -> None:
    """By default the update K J^T w is clipped to norm 1 (the authors' --max_norm): same direction, norm
    min(1, ||K J^T w||); max_norm=0 leaves it as it is. Heads learn from their own losses, unweighted."""
    matrix = rows("generic", seed=3)
    free = mtlzoo.create("fairgrad", num_tasks=4, max_norm=0.0).aggregate(matrix, torch.ones(4))
    clipped = mtlzoo.create("fairgrad", num_tasks=4).aggregate(matrix, torch.ones(4))
    assert float(free.norm()) > 1
    torch.testing.assert_close(clipped, free / free.norm())
    small = matrix * 1e-6  # with alpha = 1/4 the update's norm scales as 1e-6^(3/5): below 1, it stays
    free = mtlzoo.create("fairgrad", num_tasks=4, alpha=0.25, max_norm=0.0).aggregate(small, torch.ones(4))
    assert float(free.norm()) < 1
    torch.testing.assert_close(mtlzoo.create("fairgrad", num_tasks=4, alpha=0.25).aggregate(small, torch.ones(4)), free)
    assert mtlzoo.create("fairgrad", num_tasks=4).weighted_heads is False


def test_permuting_the_tasks_permutes_nothing_in_the_update() -> None:
    matrix = rows("conflicting", seed=4)
    strategy = mtlzoo.create("fairgrad", num_tasks=4, alpha=2.0)
    permutation = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(strategy.aggregate(matrix[permutation], torch.ones(4)),
                               strategy.aggregate(matrix, torch.ones(4)))


def test_no_solution_is_said_in_a_warning() -> None:
    """A zero row: weight 0, the others solve their equations among themselves; 0 in the rows' hull: the update 0;
    each with a SolverWarning."""
    matrix = rows("generic", seed=5)
    matrix[2] = 0
    with pytest.warns(SolverWarning, match=r"tasks \(rows\) \[2\] are zero"):
        weights = weights_of(matrix, alpha=2.0)
    assert float(weights[2]) == 0
    kept = torch.tensor([0, 1, 3])
    torch.testing.assert_close(weights[kept], weights_of(matrix[kept], alpha=2.0))
    stationary = torch.cat([matrix[:2], -(matrix[0] + 2 * matrix[1]).unsqueeze(0)])
    with pytest.warns(SolverWarning, match="Pareto-stationary"):
        update = mtlzoo.create("fairgrad", num_tasks=3).aggregate(stationary, torch.ones(3, dtype=matrix.dtype))
    assert torch.equal(update, torch.zeros_like(update))


@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), True, "2"])
def test_alpha_is_checked(alpha: object) -> None:
    with pytest.raises(ValueError, match="`alpha` should be a positive number"):
        mtlzoo.create("fairgrad", num_tasks=2, alpha=alpha)
