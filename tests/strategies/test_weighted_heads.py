"""Issue 19 item 6: under MGDA and Nash-MTL the heads learn from c_k L_k, as their authors back-propagate
sum_k c_k L_k (MultiObjectiveOptimization's train_multi_task.py; nash-mtl's weight_methods.py and LibMTL); an option
gives the unweighted heads the other aggregators use. Reference: each head's gradient by plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import InvalidModelError
from tests.helpers import batch, mse_losses, small_model


def head_gradients(name: str, **options: object) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], list]:
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, name, **options)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    got = [[p.grad.clone() for p in head.parameters()] for head in mtl.heads]
    losses = mse_losses(reference(x), targets)
    plain = [list(torch.autograd.grad(loss, list(head.parameters()), retain_graph=True))
             for loss, head in zip(losses, reference.heads)]
    return got, plain, mtl.last_step.coefficients.tolist()


@pytest.mark.parametrize("name", ["mgda", "mgda_ub", "nash_mtl"])
def test_the_authors_heads_learn_from_the_coefficient_weighted_losses(name: str) -> None:
    got, plain, coefficients = head_gradients(name)
    assert len({round(c, 6) for c in coefficients}) > 1, "the check needs unequal coefficients"
    for mine, theirs, c in zip(got, plain, coefficients):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, c * b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["mgda", "nash_mtl"])
def test_weighted_heads_false_gives_every_head_its_own_loss(name: str) -> None:
    got, plain, _ = head_gradients(name, weighted_heads=False)
    for mine, theirs in zip(got, plain):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_other_aggregators_leave_the_heads_unweighted() -> None:
    got, plain, _ = head_gradients("upgrad")
    for mine, theirs in zip(got, plain):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_parameter_shared_by_two_heads_cannot_be_weighted_by_one_task() -> None:
    shared = nn.Linear(4, 1)
    model = mtlzoo.HardSharing(nn.Linear(5, 4), [shared, nn.Sequential(shared), nn.Linear(4, 1)])
    mtl = mtlzoo.MTLWrapper(model, "mgda")
    x, targets = batch()
    before = [p.grad for p in mtl.parameters()]
    with pytest.raises(InvalidModelError, match="weighted_heads=False"):
        mtl.backward(mse_losses(mtl(x), targets))
    assert [p.grad for p in mtl.parameters()] == before
    unweighted = mtlzoo.MTLWrapper(model, "mgda", weighted_heads=False)
    unweighted.backward(mse_losses(unweighted(x), targets))


def test_weighted_heads_is_validated() -> None:
    with pytest.raises(ValueError, match="weighted_heads"):
        mtlzoo.create("mgda", num_tasks=2, weighted_heads="yes")
