"""Nash-MTL (Navon et al., ICML 2022): the bargaining solution, its clipping and state, and the inputs
where the problem has no solution.

References: the paper's characterisation of the solution (alpha_k (G alpha)_k = 1, so g_k . d = 1 / alpha_k
and ||d||^2 = K), solved by hand for orthogonal gradients (alpha_k = 1 / ||g_k||); the authors' code for
the clipping to ``max_norm`` and ``update_weights_every``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mtlzoo
from mtlzoo.errors import SolverWarning

ONES = torch.ones(3, dtype=torch.float64)


def nash(**kwargs: object) -> mtlzoo.Strategy:
    return mtlzoo.create("nash_mtl", num_tasks=kwargs.pop("num_tasks", 3), **{"max_norm": 0.0, **kwargs})


def test_orthogonal_gradients_by_hand() -> None:
    """Orthogonal g_k: alpha_k^2 ||g_k||^2 = 1, so d = sum_k g_k / ||g_k|| (every task gains 1 / alpha_k)."""
    matrix = torch.diag(torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(nash().aggregate(matrix, ONES), torch.ones(3, dtype=torch.float64))


def test_the_solution_solves_the_bargaining_equation_whatever_the_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    matrix[1] += 0.8 * matrix[0]
    strategy = nash()
    weights = strategy.gramian_weights(matrix @ matrix.T, ONES)
    torch.testing.assert_close(weights * (matrix @ matrix.T @ weights), ONES)
    update = weights @ matrix
    torch.testing.assert_close(update.norm() ** 2, torch.tensor(3.0, dtype=torch.float64))
    for scale in (1e-6, 1e3):  # the same update: the bargaining solution does not see the scale
        torch.testing.assert_close(nash().aggregate(scale * matrix, ONES), update)
    permutation = [2, 0, 1]
    torch.testing.assert_close(nash().aggregate(matrix[permutation], ONES), update)


def test_clipped_to_max_norm_and_reused_between_updates() -> None:
    """Default max_norm = 1 (the authors'): ||d|| = sqrt(K) > 1 is clipped to 1. update_weights_every = 2: the
    second step reuses the first step's weights on its own gradients."""
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randn(3, 10, generator=generator, dtype=torch.float64) for _ in range(2))
    clipped = mtlzoo.create("nash_mtl", num_tasks=3).aggregate(first, ONES)
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0, dtype=torch.float64))
    strategy = nash(update_weights_every=2)
    weights = strategy.gramian_weights(first @ first.T, ONES)
    strategy.advance()
    every = strategy.inner
    assert every.state.steps == 1 and torch.equal(every.weights, weights)
    torch.testing.assert_close(strategy.gramian_weights(second @ second.T, ONES), weights)
    strategy.advance()
    assert every.state.steps == 2
    fresh = strategy.gramian_weights(second @ second.T, ONES)
    torch.testing.assert_close(fresh * (second @ second.T @ fresh), ONES)


def test_nash_mtl_is_the_bargaining_core_under_the_modifiers() -> None:
    """Issue 18: max_norm and update_weights_every are the public modifiers ClipNorm and EveryNSteps around the
    bargaining core; composing them by hand gives the registered strategy's numbers, step after step."""
    from mtlzoo.roles import ClipNorm, EveryNSteps
    from mtlzoo.strategies.nash_mtl import NashBargaining
    generator = torch.Generator().manual_seed(3)
    registered = mtlzoo.create("nash_mtl", num_tasks=3, max_norm=0.5, update_weights_every=3)
    composed = ClipNorm(EveryNSteps(NashBargaining(3), 3), max_norm=0.5)
    for _ in range(5):
        matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64)
        ours = registered.aggregate(matrix, ONES)
        assert torch.equal(ours, composed.aggregate(matrix, ONES))
        assert float(ours.norm()) <= 0.5 * (1 + 1e-12)
        registered.advance()
        composed.advance()


def test_previous_weights_advance_only_at_advance_and_resume() -> None:
    matrix = torch.randn(3, 10, dtype=torch.float64)
    strategy = nash()
    core = strategy.inner.inner
    strategy.aggregate(matrix, ONES)
    assert torch.equal(core.previous_weights, torch.ones(3))
    strategy.discard()
    assert torch.equal(core.previous_weights, torch.ones(3)) and strategy.inner.state.steps == 0
    weights = strategy.gramian_weights(matrix @ matrix.T, ONES)
    strategy.advance()
    state = strategy.state_dict()
    assert torch.equal(state["inner.inner.previous_weights"], weights.float())
    assert state["inner._extra_state"]["state"] == {"steps": 1}
    restored = nash()
    restored.load_state_dict(state)
    assert restored.inner.state.steps == 1 and torch.equal(restored.inner.inner.previous_weights,
                                                            core.previous_weights)


def test_a_checkpoint_of_the_flat_nash_mtl_loads() -> None:
    """A state_dict written by mtlzoo 0.1.0's NashMTL (previous_weights and step on the strategy itself) loads into
    the composition: the warm start, the reused weights and the step count continue from it."""
    previous = torch.tensor([0.5, 2.0, 1.5])
    old = {"previous_weights": previous,
           "_extra_state": {"settings": {"target": None, "max_norm": 0.0, "update_weights_every": 2,
                                         "max_iterations": 200}, "state": {"step": 3}}}
    strategy = nash(update_weights_every=2)
    strategy.load_state_dict(old)
    assert strategy.inner.state.steps == 3
    assert torch.equal(strategy.inner.inner.previous_weights, previous)
    matrix = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(strategy.gramian_weights(matrix @ matrix.T, ONES), previous.double())  # reused


def test_a_zero_gradient_warns_and_the_others_bargain() -> None:
    """alpha_k (G alpha)_k = 1 cannot hold for g_k = 0 (torchjd silently reuses its previous weights): mtlzoo
    warns, gives that task weight 0 and solves the others' problem."""
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    matrix[1] = 0
    with pytest.warns(SolverWarning, match=r"tasks \(rows\) \[1\] are zero"):
        weights = nash().gramian_weights(matrix @ matrix.T, ONES)
    assert weights[1] == 0
    others = matrix[[0, 2]]
    expected = nash(num_tasks=2).gramian_weights(others @ others.T, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(weights[[0, 2]], expected)


def test_a_pareto_stationary_point_warns_and_gives_zero() -> None:
    """0 in the gradients' hull: no update improves every task, the problem has no solution; the update is 0."""
    matrix = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 3.0]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="Pareto-stationary"):
        update = nash().aggregate(matrix, ONES)
    assert torch.equal(update, torch.zeros(2, dtype=torch.float64))
    with pytest.warns(SolverWarning, match="are zero"):
        assert torch.equal(nash().aggregate(torch.zeros(3, 2), torch.ones(3)), torch.zeros(2))


def test_newton_that_does_not_converge_warns() -> None:
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1e-3], [0.0, 1.0]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="did not converge in 1 steps"):
        update = nash(max_iterations=1).aggregate(matrix, ONES)
    assert bool(torch.isfinite(update).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = nash().gramian_weights(matrix @ matrix.T, ONES)  # enough steps: no warning
    torch.testing.assert_close(weights * (matrix @ matrix.T @ weights), ONES)


@pytest.mark.parametrize(("name", "value"), [("max_norm", -1.0), ("update_weights_every", 0), ("max_iterations", 0)])
def test_hyperparameters_are_checked(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{name}`"):
        mtlzoo.create("nash_mtl", num_tasks=2, **{name: value})
