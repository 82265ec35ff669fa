"""UPGrad (Quinton & Rey, 2024) and DualProj (GEM's eq. 11): projections onto the dual cone.

References: worked examples by hand (the cone of g1 = (1, 0), g2 = (-1, 1) is d1 >= 0, d2 >= d1); the
paper's Prop. 1 (the projection's weights solve min_{v >= u} v^T G v) and its properties, checked by
the registry-wide suite (non-conflicting, stationary, linear under scaling); torchjd parity with
``reg_eps=1e-4`` in test_surgery_reference.py.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import StepInputs

MATRIX = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])


def test_upgrad_worked_example() -> None:
    """g1 projects to (1/2, 1/2), g2 to (0, 1): their mean (1/4, 3/4); a preference (1, 0) keeps g1's projection."""
    torch.testing.assert_close(mtlzoo.create("upgrad", num_tasks=2).aggregate(MATRIX, torch.ones(2)),
                               torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(mtlzoo.create("upgrad", num_tasks=2, pref_vector=[1.0, 0.0]).aggregate(
        MATRIX, torch.ones(2)), torch.tensor([0.5, 0.5]))


def test_dualproj_worked_example() -> None:
    """The mean of g1 = (1, 0), g2 = (-2, 1) is (-1/2, 1/2), outside d1 >= 0, d2 >= 2 d1: it projects to (0, 1/2).
    A mean already in the cone is kept."""
    matrix = torch.tensor([[1.0, 0.0], [-2.0, 1.0]])
    torch.testing.assert_close(mtlzoo.create("dualproj", num_tasks=2).aggregate(matrix, torch.ones(2)),
                               torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(mtlzoo.create("dualproj", num_tasks=2).aggregate(MATRIX, torch.ones(2)),
                               MATRIX.mean(0))


def test_non_conflicting_rows_are_averaged_unchanged() -> None:
    matrix = torch.rand(4, 6, dtype=torch.float64)
    for name in ("upgrad", "dualproj"):
        update = mtlzoo.create(name, num_tasks=4).aggregate(matrix, torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(update, matrix.mean(0))


def test_regularisation_and_preferences_change_the_claims() -> None:
    for name in ("upgrad", "dualproj"):
        assert "non_conflicting" in mtlzoo.create(name, num_tasks=2).properties
        assert "non_conflicting" not in mtlzoo.create(name, num_tasks=2, reg_eps=1e-4).properties
        assert "permutation_invariant" not in mtlzoo.create(name, num_tasks=2, pref_vector=[1.0, 2.0]).properties
        with pytest.raises(ValueError, match="Parameter `reg_eps`"):
            mtlzoo.create(name, num_tasks=2, reg_eps=-1.0)
        with pytest.raises(ValueError, match="Parameter `pref_vector`"):
            mtlzoo.create(name, num_tasks=2, pref_vector=[1.0, -1.0])


def test_an_absent_task_leaves_the_mean_over_the_present_ones() -> None:
    """Two of three tasks present: the default preference is 1/2 each; a given preference keeps its entries."""
    gramian = MATRIX @ MATRIX.T
    inputs = StepInputs(torch.ones(2), torch.tensor([0, 2]), 3, gramian=gramian)
    weights = mtlzoo.create("upgrad", num_tasks=3).compute(inputs).weights
    torch.testing.assert_close(weights @ MATRIX, torch.tensor([0.25, 0.75]))
    weights = mtlzoo.create("dualproj", num_tasks=3, pref_vector=[2.0, 5.0, 0.0]).compute(inputs).weights
    torch.testing.assert_close(weights @ MATRIX, torch.tensor([1.0, 1.0]))  # 2 g1 = (2, 0) projects to (1, 1)
