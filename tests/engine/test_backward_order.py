"""Issue 19, items 11 and 12: a backward refuses losses that are not of this wrapper's pending forwards before
anything reaches ``.grad``, whatever the strategy reads (the losses-only strategies included)."""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.errors import BackwardOrderError
from tests.helpers import batch, mse_losses, small_model

LOSSES_ONLY = sorted(e.name for e in mtlzoo.list_strategies() if e.info.request.where == "losses")
STRATEGIES = [*LOSSES_ONLY, "upgrad", "rotate_only", "imtl"]
OPTIONS = {"rotate_only": {"rotation_shape": 4}}


def wrapper(name: str, seed: int = 0) -> mtlzoo.MTLWrapper:
    torch.manual_seed(seed)
    return mtlzoo.MTLWrapper(small_model(), name, **OPTIONS.get(name, {}))


def grads(mtl: mtlzoo.MTLWrapper) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in mtl.parameters()]


def same(before: list[torch.Tensor | None], mtl: mtlzoo.MTLWrapper) -> bool:
    return all((a is None and p.grad is None) or (a is not None and p.grad is not None and torch.equal(a, p.grad))
               for a, p in zip(before, mtl.parameters()))


def test_the_losses_only_strategies_are_covered() -> None:
    assert {"ls", "uw", "imtl_l"} <= set(LOSSES_ONLY)


@pytest.mark.parametrize("name", STRATEGIES)
def test_losses_of_another_wrappers_forward_are_refused(name: str) -> None:
    """Item 11: the losses of another wrapper's forward would send the gradients into the other model."""
    mtl, other = wrapper(name), wrapper(name, seed=1)
    x, targets = batch()
    pending = mtl(x)  # a pending forward of this wrapper, but not the one the losses come from
    with pytest.raises(BackwardOrderError, match="do not depend on any training forward"):
        mtl.backward(mse_losses(other(x), targets))
    assert all(p.grad is None for p in (*mtl.parameters(), *other.parameters()))
    mtl.backward(mse_losses(pending, targets))  # the pending forward is still there


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_second_backward_through_used_losses_is_refused_before_any_grad(name: str) -> None:
    """Item 12: uw and imtl_l added to their parameters' .grad before torch refused the second backward."""
    mtl = wrapper(name)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses)
    before = grads(mtl)
    with pytest.raises(BackwardOrderError):
        mtl.backward(losses)
    assert same(before, mtl)


@pytest.mark.parametrize("name", LOSSES_ONLY)
def test_retained_graphs_and_several_forwards_still_work(name: str) -> None:
    """What the check must let through: a backward with retain_graph=True then another, and one backward of
    the losses of two forwards (accumulated by hand)."""
    mtl = wrapper(name)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses, retain_graph=True)
    mtl.backward(losses)
    first, second = mse_losses(mtl(x), targets), mse_losses(mtl(x[:8]), targets[:, :8])
    mtl.backward([a + b for a, b in zip(first, second)])


class DictBackbone(torch.nn.Module):
    """A backbone whose output is not a tensor (a dict its heads read): nothing to mark."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": torch.tanh(self.linear(x))}


class DictHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(features["z"])


def test_a_representation_that_cannot_be_marked_still_trains_under_a_losses_only_strategy() -> None:
    """The check needs a floating-point tensor to mark; without one the step goes on unchecked, as before."""
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(DictBackbone(), [DictHead() for _ in range(3)]), "uw")
    x, targets = batch()
    for _ in range(2):
        mtl.backward(mse_losses(mtl(x), targets))
    assert all(p.grad is not None for p in mtl.parameters())
