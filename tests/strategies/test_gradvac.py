"""Gradient Vaccine (Wang et al., ICLR 2021): Algorithm 1's correction and EMA targets, and their lifecycle.

References: the paper's update rule evaluated by hand on a worked example (the corrected gradient's
cosine with g_j equals the target exactly), and its EMA of the targets. torchjd 0.18 parity over
several steps is in test_surgery_reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import StepInputs

G1, G2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)


def with_targets(value: float, num_tasks: int = 2, **kwargs: object) -> mtlzoo.Strategy:
    strategy = mtlzoo.create("gradvac", num_tasks=num_tasks, **kwargs)
    strategy.targets.fill_(value).fill_diagonal_(0)
    return strategy


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / float(a.norm() * b.norm())


def test_worked_example_from_the_update_rule() -> None:
    """Targets 0.5, g1 = (1, 0), g2 = (0, 2) (cosine 0): g1 gains ||g1|| (0.5 - 0) / (||g2|| sqrt(0.75)) g2 and
    g2 gains ||g2|| 0.5 / (||g1|| sqrt(0.75)) g1; each corrected gradient's cosine with the other is 0.5."""
    strategy = with_targets(0.5)
    update = strategy.aggregate(torch.stack([G1, G2]), torch.ones(2, dtype=torch.float64))
    corrected1 = G1 + 1 * 0.5 / (2 * math.sqrt(0.75)) * G2
    corrected2 = G2 + 2 * 0.5 / (1 * math.sqrt(0.75)) * G1
    torch.testing.assert_close(update, corrected1 + corrected2)
    assert cosine(corrected1, G2) == pytest.approx(0.5) and cosine(corrected2, G1) == pytest.approx(0.5)
    assert bool((strategy.targets == torch.tensor([[0.0, 0.5], [0.5, 0.0]])).all())  # not advanced yet
    strategy.advance()
    torch.testing.assert_close(strategy.targets, torch.tensor([[0.0, 0.25], [0.25, 0.0]]))  # (1 - 0.5) 0.5 + 0.5 0


def test_above_its_target_a_pair_is_left_alone_and_the_target_follows() -> None:
    strategy = with_targets(-0.2, beta=0.1)
    matrix = torch.stack([G1, G1 + G2])  # cosine 1/sqrt(5) > -0.2
    torch.testing.assert_close(strategy.aggregate(matrix, torch.ones(2, dtype=torch.float64)), matrix.sum(0))
    strategy.advance()
    expected = 0.9 * -0.2 + 0.1 / math.sqrt(5)
    torch.testing.assert_close(strategy.targets[0, 1], torch.tensor(expected, dtype=torch.float32))


def test_targets_advance_once_per_step_from_the_first_micro_batch() -> None:
    """Two micro-batches read the committed targets; advance() applies the first's values; discard() drops them."""
    strategy = with_targets(0.0)
    first, second = torch.stack([G1, -G1 + G2]), torch.stack([G1, G2 + 0.1 * G1])
    strategy.aggregate(first, torch.ones(2, dtype=torch.float64))
    strategy.aggregate(second, torch.ones(2, dtype=torch.float64))
    strategy.discard()
    assert bool((strategy.targets == 0).all())
    strategy.aggregate(first, torch.ones(2, dtype=torch.float64))
    strategy.aggregate(second, torch.ones(2, dtype=torch.float64))
    strategy.advance()
    torch.testing.assert_close(strategy.targets[0, 1], torch.tensor(0.5 * cosine(G1, -G1 + G2), dtype=torch.float32))


def test_an_absent_task_keeps_its_targets_and_the_state_is_in_the_state_dict() -> None:
    strategy = with_targets(0.3, num_tasks=3)
    matrix = torch.stack([G1, G2], 0)
    inputs = StepInputs(torch.ones(2), torch.tensor([0, 2]), 3, gramian=matrix @ matrix.T)
    strategy.compute(inputs)
    strategy.advance()
    assert float(strategy.targets[0, 1]) == pytest.approx(0.3) and float(strategy.targets[1, 2]) == pytest.approx(0.3)
    assert float(strategy.targets[0, 2]) == pytest.approx(0.15)
    state = strategy.state_dict()
    assert "targets" in state
    restored = mtlzoo.create("gradvac", num_tasks=3)
    restored.load_state_dict(state)
    assert torch.equal(restored.targets, strategy.targets)


def test_targets_of_one_and_zero_gradients_stay_finite() -> None:
    """A target of exactly 1 would ask for an infinite correction (capped at 1 - 1e-6); a zero gradient takes part
    in nothing and its targets stay."""
    strategy = with_targets(1.0)
    update = strategy.aggregate(torch.stack([G1, G1 + G2]), torch.ones(2, dtype=torch.float64))
    assert bool(torch.isfinite(update).all())
    strategy = with_targets(0.4)
    update = strategy.aggregate(torch.stack([G1, torch.zeros(2, dtype=torch.float64)]),
                                torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(update, G1)
    strategy.advance()
    torch.testing.assert_close(strategy.targets[0, 1], torch.tensor(0.4))
    with pytest.raises(ValueError, match="Parameter `beta`"):
        mtlzoo.create("gradvac", num_tasks=2, beta=1.5)


def test_the_order_matters_with_three_tasks_and_is_deterministic_given_the_seed() -> None:
    matrix = torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, 0.0], [0.5, -2.0, -0.5]], dtype=torch.float64)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        strategy = with_targets(0.2, num_tasks=3)
        draws = []
        for _ in range(30):
            draws.append(strategy.aggregate(matrix, torch.ones(3, dtype=torch.float64)))
            strategy.advance()
            strategy.targets.fill_(0.2).fill_diagonal_(0)  # same targets every time: only the order varies
        runs.append(torch.stack(draws))
    torch.testing.assert_close(runs[0], runs[1])
    assert float(runs[0].std(0).max()) > 1e-3
