"""One check per property a strategy may claim (mtlzoo.strategy.PROPERTIES), on ``aggregate``."""

from __future__ import annotations

from collections.abc import Callable

import torch

Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def assert_finite(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    assert torch.isfinite(aggregate(grads, losses)).all()


def assert_permutation_invariant(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    permutation = torch.tensor([2, 0, 1])
    expected = aggregate(grads, losses)
    torch.testing.assert_close(aggregate(grads[permutation], losses[permutation]), expected)


def assert_scale_linear(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    expected = aggregate(grads, losses)
    for scale in (0.0, 0.5, 3.0):
        torch.testing.assert_close(aggregate(scale * grads, losses), scale * expected)


def assert_non_conflicting(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    update = aggregate(grads, losses)
    tolerance = 1e-5 * grads.norm() * update.norm()
    assert bool((grads @ update >= -tolerance).all())


def assert_stationary(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    """The last row replaced by minus a positive combination of the others: no update improves every task."""
    coefficients = torch.arange(1, grads.shape[0], dtype=grads.dtype) / 2 + 0.5
    stationary = torch.cat([grads[:-1], -(coefficients @ grads[:-1]).unsqueeze(0)])
    update = aggregate(stationary, losses)
    assert float(update.norm()) <= 1e-3 * float(stationary.norm()) + 1e-30


def assert_linear_under_scaling(aggregate: Aggregate, grads: torch.Tensor, losses: torch.Tensor) -> None:
    """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) for positive row scalings c1, c2 and a, b > 0."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        c1, c2 = (0.1 + torch.rand(grads.shape[0], generator=generator, dtype=grads.dtype) for _ in range(2))
        a, b = (float(0.1 + torch.rand(1, generator=generator)) for _ in range(2))
        expected = a * aggregate(c1.unsqueeze(1) * grads, losses) + b * aggregate(c2.unsqueeze(1) * grads, losses)
        actual = aggregate((a * c1 + b * c2).unsqueeze(1) * grads, losses)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(grads.norm()))


PROPERTY_ASSERTS: dict[str, Callable[[Aggregate, torch.Tensor, torch.Tensor], None]] = {
    "permutation_invariant": assert_permutation_invariant,
    "scale_linear": assert_scale_linear,
    "non_conflicting": assert_non_conflicting,
    "stationary": assert_stationary,
    "linear_under_scaling": assert_linear_under_scaling,
}
