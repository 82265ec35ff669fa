"""GradDrop (Chen et al., NeurIPS 2020): the masks of Algorithm 1 (lines 10-15), and their expectation.

References: the paper's definitions of the sign purity P and the masks M_k, from which each element's
expected update follows by hand: sum_k (l_k + (1 - l_k) q_k) g_k with q_k = P for a positive g_k and
1 - P for a negative one.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo

MATRIX = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [-1.0, -2.0, 0.5, 0.0, 1.0], [0.5, 1.0, -3.0, 0.0, 2.0]],
                      dtype=torch.float64)


def expected(matrix: torch.Tensor, leak: torch.Tensor) -> torch.Tensor:
    magnitude = matrix.abs().sum(0)
    purity = torch.where(magnitude > 0, 0.5 * (1 + matrix.sum(0) / magnitude.clamp_min(1e-300)), 0.5)
    keep = torch.where(matrix > 0, purity, torch.where(matrix < 0, 1 - purity, torch.zeros_like(purity)))
    return ((leak.unsqueeze(1) + (1 - leak.unsqueeze(1)) * keep) * matrix).sum(0)


@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0]])
def test_expectation_over_many_draws(leak: float | list[float]) -> None:
    """The mean of 4000 draws is within 4 standard errors of the closed form, element by element."""
    strategy = mtlzoo.create("graddrop", num_tasks=3, target="parameters", leak=leak, seed=0)
    draws = []
    for _ in range(4000):
        draws.append(strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64)))
        strategy.advance()
    draws = torch.stack(draws)
    leaks = torch.as_tensor(leak, dtype=torch.float64).expand(3)
    error = draws.std(0) / len(draws) ** 0.5
    assert bool(((draws.mean(0) - expected(MATRIX, leaks)).abs() <= 4 * error + 1e-12).all())


def test_each_draw_keeps_one_sign_per_element() -> None:
    """Without leak, each element is the sum of the positive or of the negative gradients; a consistent element
    (every g_k of one sign) is kept whole, and all-zero elements stay 0."""
    strategy = mtlzoo.create("graddrop", num_tasks=3, target="parameters")
    positive, negative = MATRIX.clamp(min=0).sum(0), MATRIX.clamp(max=0).sum(0)
    for _ in range(50):
        update = strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
        assert bool(((update == positive) | (update == negative)).all())
        assert update[4] == 6.0 and update[3] == 0.0
        strategy.advance()


def test_full_leak_is_the_plain_sum_and_leaks_are_per_task() -> None:
    strategy = mtlzoo.create("graddrop", num_tasks=3, leak=1.0)
    torch.testing.assert_close(strategy.aggregate(MATRIX, torch.ones(3, dtype=torch.float64)), MATRIX.sum(0))
    with pytest.raises(ValueError, match="Parameter `leak`"):
        mtlzoo.create("graddrop", num_tasks=3, leak=[0.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="Parameter `leak`"):
        mtlzoo.create("graddrop", num_tasks=3, leak=[0.0, 1.0])


def test_per_draw_permutation_invariant_and_scale_linear() -> None:
    """One U per element, drawn whatever the task order: the same seed gives the same update for permuted or
    scaled rows (P does not depend on either)."""
    reference = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(MATRIX, torch.ones(3, dtype=torch.float64))
    permuted = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(MATRIX[[2, 0, 1]],
                                                                          torch.ones(3, dtype=torch.float64))
    scaled = mtlzoo.create("graddrop", num_tasks=3, seed=7).aggregate(3 * MATRIX, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(permuted, reference)
    torch.testing.assert_close(scaled, 3 * reference)


def test_on_the_representation_the_masks_are_per_batch_element() -> None:
    """Gradients on z of shape (K, B, d): one purity and one U per batch element and feature."""
    strategy = mtlzoo.create("graddrop", num_tasks=2, seed=0)
    assert strategy.request.where == "representation"
    grads = torch.stack([torch.ones(4, 3), -torch.ones(4, 3)])  # P = 1/2 everywhere
    update = strategy.aggregate(grads, torch.ones(2))
    assert update.shape == (4, 3) and bool(((update == 1) | (update == -1)).all())
    assert 0 < int((update == 1).sum()) < 12
