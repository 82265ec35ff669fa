"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): the update of equal cosine with every task gradient."""

from __future__ import annotations

import pytest
import torch

import mtlzoo


def authors_config(rows: torch.Tensor) -> torch.Tensor:
    """The authors' ConFIG_update with its defaults (conflictfree/grad_operator.py: equal weights, projection length,
    least squares), reimplemented on the rows: u = lstsq(unit rows, 1), d = (sum_k g_k . u^) u^."""
    units = torch.nan_to_num(rows / rows.norm(dim=1, keepdim=True), 0.0)
    best = torch.linalg.lstsq(units, torch.ones(rows.shape[0], 1, dtype=rows.dtype), driver="gelsd").solution[:, 0]
    direction = best / best.norm()
    return (rows @ direction).sum() * direction


def test_worked_example() -> None:
    """Orthogonal rows of norms 1 and 2: the bisector u = (1, 1) / sqrt(2), length (1 + 2) / sqrt(2): d = (1.5, 1.5)."""
    update = mtlzoo.create("config", num_tasks=2).aggregate(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2))
    torch.testing.assert_close(update, torch.tensor([1.5, 1.5]))


@pytest.mark.parametrize(("size", "width"), [(3, 20), (6, 4), (5, 5)])
def test_equals_the_authors_least_squares_form(size: int, width: int) -> None:
    """On the rows themselves, as the authors compute it, with fewer, more, or as many tasks as dimensions (then the
    least-squares direction): the same update to 1e-10 of ||J||, a zero row left out as their nan_to_num does."""
    generator = torch.Generator().manual_seed(size * width)
    rows = torch.randn(size, width, generator=generator, dtype=torch.float64)
    rows[1] *= 1e3
    rows[-1] = 0
    update = mtlzoo.create("config", num_tasks=size).aggregate(rows, torch.ones(size, dtype=rows.dtype))
    assert float((update - authors_config(rows)).norm()) <= 1e-10 * float(rows.norm())


def test_independent_rows_get_equal_cosines_and_no_conflict() -> None:
    """Where the rows are linearly independent, U u is a constant vector: every task gradient makes the same positive
    angle with d, whatever their sizes (1e-3 to 1e3 here)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, generator=generator, dtype=torch.float64) * torch.logspace(-3, 3, 5).unsqueeze(1)
    update = mtlzoo.create("config", num_tasks=5).aggregate(rows, torch.ones(5, dtype=rows.dtype))
    cosines = (rows / rows.norm(dim=1, keepdim=True)) @ (update / update.norm())
    torch.testing.assert_close(cosines, cosines.mean().expand(5), rtol=1e-10, atol=0)
    assert float(cosines.min()) > 0


def test_rows_dependent_to_rounding_count_as_dependent() -> None:
    """A row equal to a combination of two others up to 1e-10 of its size (its part outside their span is far below
    the sqrt(K eps) the Gramian resolves): the update is the one of the exactly dependent rows, to 1e-8. The authors'
    least squares on the rows resolve that part, turn the direction along it and return an update of norm 6e-9 (the
    exactly dependent rows': 17): the one place where they differ, documented in ConFIG's docstring."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2, 30, generator=generator, dtype=torch.float64)
    exact = torch.cat([base, (base[0] + 2 * base[1]).unsqueeze(0)])
    nearly = exact.clone()
    nearly[2] += 1e-10 * exact[2].norm() * torch.randn(30, generator=generator, dtype=torch.float64) / 30**0.5
    strategy = mtlzoo.create("config", num_tasks=3)
    reference = strategy.aggregate(exact, torch.ones(3, dtype=exact.dtype))
    assert float(reference.norm()) > 1 and float(authors_config(nearly).norm()) < 1e-6
    torch.testing.assert_close(strategy.aggregate(nearly, torch.ones(3, dtype=exact.dtype)), reference, rtol=1e-8,
                               atol=1e-8 * float(reference.norm()))
