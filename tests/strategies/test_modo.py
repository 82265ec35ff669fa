"""MoDo (Chen et al., JMLR 2024): a worked example by hand, its pull towards MGDA's weights, its state and settings.

References: the paper's double-sampling step (worked by hand below); MGDA's exact minimum-norm weights
(mtlzoo.solvers.min_norm_simplex, Wolfe's algorithm, itself checked against torchjd) as the fixed point of MoDo's
weight steps on one Jacobian with ρ = 0. torchjd 0.18's MoDoWeighting is in test_multibatch_reference.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mtlzoo
from mtlzoo.errors import ReusedBatchWarning
from mtlzoo.solvers import min_norm_simplex

CONFLICT = torch.tensor([[3.0, 0.0, 1.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
ONES = torch.ones(2, dtype=torch.float64)


def test_two_batches_by_hand() -> None:
    """J1 = CONFLICT, J2 = [[1, 1, 0], [0, 1, 1]]: J1 J2^T = [[3, 1], [-1, 1]], (J1 J2^T + 0.1 I) λ_0 = (2.05, 0.05),
    λ_0 - 0.1 (...) = (0.295, 0.495), projected: (0.4, 0.6); d = (J1 + J2)^T λ / 2 = (0.2, 0.8, 0.5)."""
    second = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    modo = mtlzoo.create("modo", num_tasks=2)
    update = modo.aggregate(CONFLICT, ONES, more_batches=[second])
    torch.testing.assert_close(update, torch.tensor([0.2, 0.8, 0.5], dtype=torch.float64))
    modo.advance()
    torch.testing.assert_close(modo.weights, torch.tensor([0.4, 0.6], dtype=torch.float64))
    mean = (CONFLICT + second).sum(0) / 4  # what ls would give, up to its factor: (0.5, 0.75, 0.5)
    assert float((update / update.norm() - mean / mean.norm()).norm()) > 0.1


def test_one_batch_on_a_conflict_by_hand_warns_once() -> None:
    """J2 = J1: G = [[10, -6], [-6, 5]], G λ_0 + 0.1 λ_0 = (2.05, -0.45), λ = Π(0.295, 0.545) = (0.375, 0.625);
    d = J^T λ = (-0.125, 0.625, 0.375): the weight moves to the task the mean hurts (g_2 . mean < 0)."""
    modo = mtlzoo.create("modo", num_tasks=2)
    with pytest.warns(ReusedBatchWarning, match="MoDo reads 2 independent batches per backward, 1 given"):
        update = modo.aggregate(CONFLICT, ONES)
    torch.testing.assert_close(update, torch.tensor([-0.125, 0.625, 0.375], dtype=torch.float64))
    assert float(CONFLICT[1] @ update) > 0 > float(CONFLICT[1] @ CONFLICT.mean(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modo.aggregate(CONFLICT, ONES)  # said once


def test_its_weights_settle_at_mgdas_on_one_jacobian() -> None:
    """With ρ = 0, MoDo's weight steps on a fixed Jacobian are projected gradient descent on ||J^T λ||^2 / 2: they
    settle at MGDA's minimum-norm weights (ls stays at 1/K). γ below 2 / ||G||."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [4.0]],
                                                                                       dtype=torch.float64)
    gramian = matrix @ matrix.T
    modo = mtlzoo.create("modo", num_tasks=3, gamma=1 / float(torch.linalg.eigvalsh(gramian).max()), rho=0.0)
    for _ in range(3000):
        modo.aggregate(matrix, torch.ones(3, dtype=torch.float64), more_batches=[matrix])
        modo.advance()
    expected = min_norm_simplex(gramian)
    torch.testing.assert_close(modo.weights, expected, rtol=0, atol=1e-8)
    assert float((expected - 1 / 3).abs().max()) > 0.1


def test_an_absent_task_keeps_its_weight_and_the_others_move_on_their_simplex() -> None:
    modo = mtlzoo.create("modo", num_tasks=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedBatchWarning)
        modo.aggregate(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    modo.advance()
    before = modo.weights.clone()
    inputs = mtlzoo.StepInputs(torch.ones(2, dtype=torch.float64), torch.tensor([0, 2]), 3,
                               gradients=CONFLICT.clone(), extra=[mtlzoo.StepInputs(
                                   torch.ones(2, dtype=torch.float64), torch.tensor([0, 2]), 3,
                                   gradients=CONFLICT.clone())])
    modo.compute(inputs)
    modo.advance()
    assert float(modo.weights[1]) == float(before[1])
    torch.testing.assert_close(modo.weights[[0, 2]], project_pair(before[[0, 2]]))


def project_pair(start: torch.Tensor) -> torch.Tensor:
    """Π(λ - 0.1 (G λ + 0.1 λ)) for CONFLICT's Gramian on two weights (a pair's projection: shift both equally)."""
    moved = start - 0.1 * (CONFLICT @ CONFLICT.T @ start + 0.1 * start)
    moved = moved + (1 - moved.sum()) / 2
    return moved.clamp(0, 1) / moved.clamp(0, 1).sum()


@pytest.mark.parametrize(("option", "value"), [("gamma", 0.0), ("gamma", -1.0), ("rho", -0.1), ("gamma", True),
                                               ("rho", float("nan"))])
def test_settings_are_checked(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{option}` should be"):
        mtlzoo.create("modo", num_tasks=2, **{option: value})
