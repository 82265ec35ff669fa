"""PCD (Varam & AlHajri, TMLR 2026): follow task 1's gradient, each other task guaranteed a share of its progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.errors import SolverWarning
from mtlzoo.roles import HostStep


def step_of(tasks: list[int], num_tasks: int) -> HostStep:
    return HostStep(np.ones(len(tasks)), np.array(tasks), num_tasks, float(np.finfo(np.float64).eps))


def test_a_primary_gradient_that_satisfies_the_constraints_is_the_update() -> None:
    """Cor. 4.3: where g_1 already gives every secondary its share (u_1 . u_j >= tau), d = g_1."""
    rows = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    update = mtlzoo.create("pcd", num_tasks=3, tau=0.1).aggregate(rows, torch.ones(3, dtype=rows.dtype))
    torch.testing.assert_close(update, rows[0])


def test_the_binding_constraint_holds_with_equality_and_the_norm_is_the_primarys() -> None:
    """A fresh moving average normalises each row to unit norm (up to eps): on the normalised rows the binding
    secondary gets exactly tau of its own progress, u_j . d~ = tau, the other at least tau; ||d|| = ||g_1||."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 12, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [30.0], [0.1]])
    rows[1:] -= 1.5 * rows[0] * rows[1:].norm(dim=1, keepdim=True) / rows[0].norm()
    tau = 0.3
    update = mtlzoo.create("pcd", num_tasks=3, tau=tau).aggregate(rows, torch.ones(3, dtype=rows.dtype))
    units = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(update.norm(), rows[0].norm())
    assert bool((units[1:] @ update > 0).all())  # every secondary progresses
    tilde = torch.linalg.lstsq(units.T, update.unsqueeze(1)).solution.squeeze(1)
    tilde = tilde / tilde[0]  # d~ = u_1 + sum_j mu_j u_j, mu >= 0, at least one constraint binding
    assert bool((tilde[1:] >= -1e-9).all()) and float(tilde[1:].max()) > 1e-3
    slack = units[1:] @ (tilde @ units) - tau
    assert bool((slack >= -1e-7).all()) and bool(((slack.abs() <= 1e-7) | (tilde[1:].abs() <= 1e-9)).all())


def test_a_secondary_loss_scaled_by_a_constant_leaves_the_update_unchanged() -> None:
    """The authors' point of the normalisation: a secondary task's gradient multiplied by 1000 at every step gives
    the same updates over five steps, up to eps = 1e-8 against squared norms of order 10 (1e-8 relative)."""
    generator = torch.Generator().manual_seed(1)
    plain, scaled = mtlzoo.create("pcd", num_tasks=3, tau=0.2), mtlzoo.create("pcd", num_tasks=3, tau=0.2)
    factor = torch.tensor([[1.0], [1000.0], [1.0]], dtype=torch.float64)
    for _ in range(5):
        rows = torch.randn(3, 10, generator=generator, dtype=torch.float64)
        rows[1] -= rows[0]
        expected = plain.aggregate(rows, torch.ones(3, dtype=rows.dtype))
        torch.testing.assert_close(scaled.aggregate(rows * factor, torch.ones(3, dtype=rows.dtype)), expected,
                                   rtol=1e-7, atol=1e-7 * float(expected.norm()))
        plain.advance()
        scaled.advance()


def test_the_moving_average_follows_its_recurrence_per_task() -> None:
    """v_k <- beta v_k + (1 - beta) ||g_k||^2 and the step count t_k of each task present, s_k = 1/sqrt(v_k /
    (1 - beta^t_k) + eps); a task absent from a step keeps both. Checked by hand over three steps (task 0 absent from
    the second, where task 1 leads: the update is then PCD of tasks 1 and 2 on their own)."""
    beta = 0.5
    strategy = mtlzoo.create("pcd", num_tasks=3, tau=0.2, beta=beta)
    generator = torch.Generator().manual_seed(2)
    moments, counts = np.zeros(3), np.zeros(3)
    for tasks in ([0, 1, 2], [1, 2], [0, 1, 2]):
        rows = torch.randn(len(tasks), 8, generator=generator, dtype=torch.float64).numpy()
        gramian = rows @ rows.T
        before = moments.copy(), counts.copy()
        weights = strategy.weigh(gramian, step_of(tasks, 3))
        moments[tasks] = beta * moments[tasks] + (1 - beta) * np.diag(gramian)
        counts[tasks] += 1
        if tasks == [1, 2]:  # the same as a PCD of these two tasks, from their state
            alone = mtlzoo.create("pcd", num_tasks=2, tau=0.2, beta=beta)
            with alone.state.direct():
                alone.state.second_moments = torch.from_numpy(before[0][tasks])
                alone.state.counts = torch.from_numpy(before[1][tasks]).long()
            np.testing.assert_allclose(weights, alone.weigh(gramian, step_of([0, 1], 2)), rtol=1e-12)
        strategy.advance()
        np.testing.assert_allclose(strategy.second_moments.numpy(), moments, rtol=1e-15)
        np.testing.assert_array_equal(strategy.counts.numpy(), counts)
    assert counts.tolist() == [2, 3, 3]


def test_a_zero_primary_gradient_halts_and_infeasible_constraints_fall_back_to_it() -> None:
    """Algorithm 1: g_1 = 0 gives 0 (the average still updated); two exactly opposite secondaries cannot both
    progress: the constraints are dropped, d = g_1, said in a SolverWarning."""
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    strategy = mtlzoo.create("pcd", num_tasks=3)
    assert torch.equal(strategy.aggregate(rows, torch.ones(3, dtype=rows.dtype)), torch.zeros(2, dtype=rows.dtype))
    strategy.advance()
    assert strategy.counts.tolist() == [1, 1, 1] and float(strategy.second_moments[1]) > 0
    opposite = torch.tensor([[1.0, 2.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="cannot all hold"):
        update = mtlzoo.create("pcd", num_tasks=3).aggregate(opposite, torch.ones(3, dtype=rows.dtype))
    torch.testing.assert_close(update, opposite[0])


def test_tau_zero_only_keeps_the_secondaries_from_getting_worse() -> None:
    """tau = 0: the projection of g_1 onto {d : g_j . d >= 0}; for one secondary at 135 degrees, g_1 minus its
    component along g_2 (a PCGrad step for the primary alone), of norm ||g_1||."""
    rows = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    update = mtlzoo.create("pcd", num_tasks=2, tau=0.0).aggregate(rows, torch.ones(2, dtype=rows.dtype))
    projected = rows[0] - (rows[0] @ rows[1]) / (rows[1] @ rows[1]) * rows[1]
    torch.testing.assert_close(update, projected / projected.norm())  # ||g_1|| = 1
    assert float(rows[1] @ update) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("tau", [-0.1, 1.5, [0.1, 0.2, 0.3], [[0.1, 0.2]], "0.1", True])
def test_tau_is_checked(tau: object) -> None:
    with pytest.raises(ValueError, match=r"`tau` should be a number in \[0, 1\] or 2 numbers"):
        mtlzoo.create("pcd", num_tasks=3, tau=tau)


def test_priority_is_not_symmetric() -> None:
    """Swapping the primary changes the update (no permutation-invariance claim in the metadata)."""
    rows = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    strategy = mtlzoo.create("pcd", num_tasks=2, tau=0.5)
    first = strategy.aggregate(rows, torch.ones(2, dtype=rows.dtype))
    swapped = mtlzoo.create("pcd", num_tasks=2, tau=0.5).aggregate(rows.flip(0), torch.ones(2, dtype=rows.dtype))
    assert float((first - swapped).norm()) > 0.1
    assert "permutation_invariant" not in strategy.properties
