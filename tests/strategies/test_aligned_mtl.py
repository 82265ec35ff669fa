"""Aligned-MTL (Senushkin et al., CVPR 2023): the balance transformation of Algorithm 1.

References: the paper's claim that the aligned gradients B J are orthogonal with equal norms along the
principal directions (condition number one), and a worked example by hand; the authors' code
(SamsungLabs/MTL, ``ProcrustesSolver``) for the scale modes, the rank cut-off and the sum over tasks.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.aligned_mtl import balance_transformation


def test_worked_example() -> None:
    """J = diag(2, 1): G = diag(4, 1), B = sqrt(1) diag(1/2, 1), the aligned rows are e1 and e2, their sum (1, 1)."""
    matrix = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(balance_transformation(matrix @ matrix.T), torch.diag(torch.tensor([0.5, 1.0])))
    torch.testing.assert_close(mtlzoo.create("aligned_mtl", num_tasks=2).aggregate(matrix, torch.ones(2)),
                               torch.ones(2))


@pytest.mark.parametrize(("mode", "pick"), [("min", lambda v: v.min()), ("median", lambda v: v.median()),
                                            ("rmse", lambda v: v.mean())])
def test_aligned_gradients_are_orthogonal_with_equal_norms(mode: str, pick: object) -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(4, 30, generator=generator, dtype=torch.float64) * torch.tensor([[5.0], [1.0], [0.2], [1.0]])
    gramian = matrix @ matrix.T
    aligned = balance_transformation(gramian, mode) @ matrix
    scale = pick(torch.linalg.eigvalsh(gramian))  # type: ignore[operator]
    torch.testing.assert_close(aligned @ aligned.T, scale * torch.eye(4, dtype=torch.float64))
    strategy = mtlzoo.create("aligned_mtl", num_tasks=4, scale_mode=mode)
    torch.testing.assert_close(strategy.aggregate(matrix, torch.ones(4, dtype=torch.float64)), aligned.sum(0))


def test_rank_deficient_and_zero_gramians() -> None:
    """Only the range of G is aligned (eigenvalues below lambda_max K eps32 are dropped, as the authors' code);
    a zero Gramian gives no update; task weights weigh the aligned rows."""
    row = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    matrix = torch.stack([row, 2 * row, torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)])
    update = mtlzoo.create("aligned_mtl", num_tasks=3).aggregate(matrix, torch.ones(3, dtype=torch.float64))
    assert bool(torch.isfinite(update).all())
    balance = balance_transformation(matrix @ matrix.T)
    aligned = balance @ matrix
    values = torch.linalg.eigvalsh(aligned @ aligned.T)
    torch.testing.assert_close(values[values > 1e-9], values[-1].expand(2))
    assert torch.equal(balance_transformation(torch.zeros(3, 3)), torch.zeros(3, 3))
    weighted = mtlzoo.create("aligned_mtl", num_tasks=3, pref_vector=[1.0, 0.0, 2.0])
    torch.testing.assert_close(weighted.aggregate(matrix, torch.ones(3, dtype=torch.float64)),
                               aligned[0] + 2 * aligned[2])
    assert "permutation_invariant" not in weighted.properties
    with pytest.raises(ValueError, match="Parameter `scale_mode`"):
        mtlzoo.create("aligned_mtl", num_tasks=2, scale_mode="max")
