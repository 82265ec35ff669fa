"""The Gramian solvers across task scales and task orders (issue 19, items 4 and 5).

References: the non-conflicting property (J d >= 0, a property of the methods' definitions, checked per row
relative to that row's size) on Jacobians whose rows are scaled apart by up to 1e12, as torchjd's property tests
scale their matrices; the issue's worked Jacobian J = [[-2e6, -2e6], [-2, -1], [1, -1]], whose minimum-norm
point (0, -1) follows by hand (the segment between rows 2 and 3 passes through it, and the huge row pulls the
norm up); permutation invariance at K = 20 in float32 within torchjd 0.18's own tolerance for these methods
(``assert_permutation_invariant``: atol = rtol = 1e-4).
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo

NON_CONFLICTING = ("mgda", "mgda_ub", "upgrad", "dualproj")


def conflicts(rows: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``g_k . d`` relative to ``||g_k|| ||d||`` (negative: the update conflicts with task k)."""
    sizes = rows.norm(dim=1) * update.norm()
    return torch.where(sizes > 0, rows @ update / torch.where(sizes > 0, sizes, 1), 0)


@pytest.mark.parametrize("name", NON_CONFLICTING)
def test_the_issue_jacobian_is_not_conflicting(name: str) -> None:
    """Before the fix mgda returned d = (1, -1) here (J d = (0, -1, 2): it conflicts with task 2)."""
    rows = torch.tensor([[-2e6, -2e6], [-2.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    update = mtlzoo.create(name, num_tasks=3).aggregate(rows, torch.ones(3, dtype=torch.float64))
    assert bool((conflicts(rows, update) >= -1e-12).all()), (name, update, rows @ update)
    if name.startswith("mgda"):
        torch.testing.assert_close(update, torch.tensor([0.0, -1.0], dtype=torch.float64), rtol=0, atol=1e-9)


def scaled_apart(size: int, seed: int, spread: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(size, 6, generator=generator, dtype=torch.float64)
    rows[1:] -= 1.5 * torch.rand(size - 1, 1, generator=generator, dtype=torch.float64) * rows[0]  # conflicts
    scales = torch.logspace(0, spread, size, dtype=torch.float64)[torch.randperm(size, generator=generator)]
    return rows * scales[:, None]


@pytest.mark.parametrize("spread", [3.0, 6.0, 12.0])
@pytest.mark.parametrize("size", [2, 3, 5, 8])
@pytest.mark.parametrize("name", NON_CONFLICTING)
def test_non_conflicting_with_rows_scaled_apart(name: str, size: int, spread: float) -> None:
    """Rows scaled by 1 to 10^spread: each row's cosine with the update is non-negative up to float64's rounding
    of that cosine (the solvers' tolerances are relative to each row's own size)."""
    for seed in range(4):
        rows = scaled_apart(size, seed, spread)
        update = mtlzoo.create(name, num_tasks=size).aggregate(rows, torch.ones(size, dtype=torch.float64))
        if float(update.norm()) == 0:
            continue
        assert float(conflicts(rows, update).min()) >= -1e-9, (seed, rows @ update)


@pytest.mark.parametrize("spread", [3.0, 6.0])
@pytest.mark.parametrize("name", NON_CONFLICTING)
def test_non_conflicting_with_rows_scaled_apart_in_float32(name: str, spread: float) -> None:
    """The same in float32 (the Gramian, the update): cosines non-negative up to ten of float32's rounding units."""
    for size in (2, 3, 5, 8):
        for seed in range(4):
            rows = scaled_apart(size, seed, spread).float()
            update = mtlzoo.create(name, num_tasks=size).aggregate(rows, torch.ones(size))
            if float(update.norm()) == 0:
                continue
            assert float(conflicts(rows.double(), update.double()).min()) >= -1e-6, (size, seed, rows @ update)


def twenty_tasks(kind: str, seed: int) -> torch.Tensor:
    """(20, n) float32 rows: generic (n = 30), more tasks than dimensions (n = 5, a rank-deficient Gramian), or
    with the rows' sizes spread over 1e-3 to 1e3 (n = 10, 19, 100)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "wide":
        return torch.randn(20, 30, generator=generator)
    if kind == "narrow":
        return torch.randn(20, 5, generator=generator)
    width = int(kind.removeprefix("scaled"))
    return torch.randn(20, width, generator=generator) * torch.logspace(-3, 3, 20)[:, None]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["wide", "narrow", "scaled10", "scaled19", "scaled100"])
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_permutation_invariant_at_twenty_tasks_in_float32(name: str, kind: str, seed: int) -> None:
    """torchjd's check: five random row permutations, the update equal within atol = rtol = 1e-4. Before the fix
    (tolerances relative to the largest row, an eigenvalue cut-off on the unit-trace Gramian) the scaled cases
    missed it by factors up to ~800."""
    rows = twenty_tasks(kind, seed)
    losses = torch.ones(20)
    update = mtlzoo.create(name, num_tasks=20).aggregate(rows, losses)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        permutation = torch.randperm(20, generator=generator)
        permuted = mtlzoo.create(name, num_tasks=20).aggregate(rows[permutation], losses)
        torch.testing.assert_close(permuted, update, atol=1e-4, rtol=1e-4)
