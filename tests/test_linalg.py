"""The shared maths of mtlzoo.linalg: row norms without overflow or underflow.

Reference: the norms of the same rows computed in float64 by numpy (whose range holds the square of any float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlzoo.linalg import all_finite, row_norms


def _reference(matrix: torch.Tensor, dim: int = 0) -> np.ndarray:
    rows = np.moveaxis(matrix.double().numpy(), dim, 0)
    return np.linalg.norm(rows.reshape(rows.shape[0], -1), axis=1)


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30, 1e19, 1e-18])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_row_norms_match_float64_at_every_scale(scale: float, rows: int, dtype: torch.dtype) -> None:
    """Rows of 40,000 entries (above the size where the float32 sum is tried first) whose squares overflow or
    underflow float32 (1e30, 1e-30), near the bounds (1e19, 1e-18), and ordinary ones: every norm within float32
    rounding of float64's, in the input's dtype. Fails if an out-of-range float32 sum is returned as it is."""
    generator = torch.Generator().manual_seed(rows)
    matrix = (torch.randn(rows, 200, 200, generator=generator, dtype=torch.float64) * scale).to(dtype)
    norms = row_norms(matrix)
    assert norms.dtype == dtype and norms.shape == (rows,)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    np.testing.assert_allclose(norms.double().numpy(), _reference(matrix), rtol=tolerance)


def test_row_norms_of_mixed_rows_zero_rows_and_a_moved_dimension() -> None:
    """A zero row, a huge and a tiny row side by side (one out-of-range row sends all to float64), and the
    norms along dimension 1 of a non-contiguous layout."""
    matrix = torch.randn(4, 100, 50)
    matrix[0] = 0
    matrix[1] *= 1e30
    matrix[2] *= 1e-30
    np.testing.assert_allclose(row_norms(matrix).double().numpy(), _reference(matrix), rtol=1e-5)
    np.testing.assert_allclose(row_norms(matrix, dim=1).double().numpy(), _reference(matrix, 1), rtol=1e-5)


def test_a_non_finite_row_gives_a_non_finite_norm() -> None:
    matrix = torch.randn(3, 100, 50)
    matrix[1, 0, 0] = float("nan")
    matrix[2, 0, 0] = float("inf")
    norms = row_norms(matrix)
    assert torch.isfinite(norms[0]) and torch.isnan(norms[1]) and torch.isinf(norms[2])


def test_all_finite_is_exact_where_its_sum_is_not() -> None:
    """The sum-based check: finite entries whose sum overflows are finite; inf, -inf and NaN are not."""
    huge = torch.full((4,), 3e38)
    assert all_finite(huge) and all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), 1.0]))
