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


PROPERTY_ASSERTS: dict[str, Callable[[Aggregate, torch.Tensor, torch.Tensor], None]] = {
    "permutation_invariant": assert_permutation_invariant,
    "scale_linear": assert_scale_linear,
    "non_conflicting": assert_non_conflicting,
}
