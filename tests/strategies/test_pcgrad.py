"""PCGrad (Yu et al., NeurIPS 2020): Algorithm 1's properties, and its expectation over the random orders.

References: the paper's Algorithm 1, evaluated by hand for every order (the exact expectation over
the uniformly random orders); its claims that non-conflicting gradients are left untouched and that
with two tasks the update conflicts with neither.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mtlzoo

MATRIX = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.5, -2.0, -0.5]], dtype=torch.float64)
"""Three tasks, every pair conflicting, so the order of the projections matters."""


def by_hand(matrix: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 with the given order of the other tasks for each task (projections on the original g_j)."""
    total = torch.zeros_like(matrix[0])
    for i, order in enumerate(orders):
        projected = matrix[i].clone()
        for j in order:
            product = projected @ matrix[j]
            if product < 0:
                projected = projected - product / (matrix[j] @ matrix[j]) * matrix[j]
        total += projected
    return total


def exact_expectation(matrix: torch.Tensor) -> torch.Tensor:
    size = matrix.shape[0]
    each = [list(itertools.permutations([j for j in range(size) if j != i])) for i in range(size)]
    combos = list(itertools.product(*each))
    return torch.stack([by_hand(matrix, [list(o) for o in combo]) for combo in combos]).mean(0)


def test_every_draw_is_algorithm_one_for_some_order() -> None:
    strategy = mtlzoo.create("pcgrad", num_tasks=3, seed=0)
    candidates = [by_hand(MATRIX, [list(o) for o in combo]) for combo in itertools.product(
        *[list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)])]
    seen = set()
    for _ in range(40):
        update = strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
        strategy.advance()
        matches = [k for k, c in enumerate(candidates) if torch.allclose(update, c, rtol=1e-12, atol=1e-12)]
        assert matches, update
        seen.add(matches[0])
    assert len(seen) > 2  # the orders are random


def test_expectation_over_many_draws_equals_the_exact_one() -> None:
    """The mean of 3000 draws is within 4 standard errors of the exact expectation over the orders (which is
    permutation invariant, unlike any fixed order)."""
    strategy = mtlzoo.create("pcgrad", num_tasks=3, seed=1)
    draws = []
    for _ in range(3000):
        draws.append(strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64)))
        strategy.advance()
    draws = torch.stack(draws)
    expected = exact_expectation(MATRIX)
    error = draws.std(0) / len(draws) ** 0.5
    assert bool(((draws.mean(0) - expected).abs() <= 4 * error + 1e-12).all())
    permutation = [2, 0, 1]
    torch.testing.assert_close(exact_expectation(MATRIX[permutation]), expected)
    assert float(draws.std(0).max()) > 0.01


def test_non_conflicting_gradients_are_left_untouched() -> None:
    """No pair conflicts: the update is the plain sum, whatever the order."""
    matrix = torch.rand(5, 8, dtype=torch.float64)
    strategy = mtlzoo.create("pcgrad", num_tasks=5)
    for _ in range(5):
        torch.testing.assert_close(strategy.aggregate(matrix, torch.ones(5, dtype=torch.float64)), matrix.sum(0))


def test_with_two_tasks_the_update_conflicts_with_neither() -> None:
    """The paper's two-task analysis: g1^PC is normal to g2 and g2^PC to g1, so d . g_k >= 0."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        matrix = torch.randn(2, 10, generator=generator, dtype=torch.float64)
        update = mtlzoo.create("pcgrad", num_tasks=2).aggregate(matrix, torch.ones(2, dtype=torch.float64))
        assert bool((matrix @ update >= -1e-12).all())


def test_deterministic_given_the_seed_and_scale_linear_per_draw() -> None:
    torch.manual_seed(3)
    first = mtlzoo.create("pcgrad", num_tasks=3)
    torch.manual_seed(3)
    second = mtlzoo.create("pcgrad", num_tasks=3)
    for _ in range(5):
        a = first.aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
        b = second.aggregate(2.5 * MATRIX, torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(2.5 * a, b)
        first.advance()
        second.advance()


def test_the_generator_advances_at_advance_and_a_skipped_step_draws_again() -> None:
    """The orders' generator is running state: state_dict() keeps the last step boundary's state during a step,
    discard() (a step the GradScaler skipped) draws the same orders again, advance() commits, and a resumed copy
    draws what the original draws next."""
    ones = torch.ones(3, dtype=torch.float64)
    strategy = mtlzoo.create("pcgrad", num_tasks=3, seed=5)
    before = strategy.state_dict()["_extra_state"]["state"]["generator"]
    first = strategy.aggregate(MATRIX, ones)
    assert strategy.state_dict()["_extra_state"]["state"]["generator"] == before
    strategy.discard()
    torch.testing.assert_close(strategy.aggregate(MATRIX, ones), first)
    strategy.advance()
    state = strategy.state_dict()
    assert state["_extra_state"]["state"]["generator"] != before
    resumed = mtlzoo.create("pcgrad", num_tasks=3, seed=99)
    resumed.load_state_dict(state)
    for _ in range(3):
        torch.testing.assert_close(resumed.aggregate(MATRIX, ones), strategy.aggregate(MATRIX, ones))
        resumed.advance()
        strategy.advance()


def test_pcgrad_claims_no_deterministic_property() -> None:
    """Stochastic: its properties hold per draw or in expectation (above), not for fresh instances."""
    info = mtlzoo.get_strategy("pcgrad").info
    assert info.stochastic and not info.properties
    with pytest.raises(ValueError, match="Parameter `target`"):
        mtlzoo.create("pcgrad", num_tasks=2, target="losses")
