"""IMTL-L, learned loss scales (Liu et al., ICLR 2021): sum_k exp(s_k) L_k - s_k."""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.imtl_l import IMTLL, imtl_l_total
from tests.helpers import batch, mse_losses, small_model
from tests.strategies import _regression


def test_the_class_lives_where_the_combined_imtl_imports_it() -> None:
    assert mtlzoo.get_strategy("imtl_l").cls is IMTLL
    assert callable(imtl_l_total)


def test_worked_example_by_hand() -> None:
    """s = (0, log 2), L = (3, 0.5): total = 3 + (2 * 0.5 - log 2) = 4 - log 2, w = exp(s) = (1, 2),
    d total / d s = exp(s) L - 1 = (2, 0)."""
    imtl = mtlzoo.create("imtl_l", num_tasks=2)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.0, math.log(2)]))
    losses = torch.tensor([3.0, 0.5])
    total = imtl.scalarize(losses)
    torch.testing.assert_close(total.detach(), torch.tensor(4 - math.log(2)))
    torch.testing.assert_close(imtl.weights(losses), torch.tensor([1.0, 2.0]))
    (grad,) = torch.autograd.grad(total, imtl.log_scales)
    torch.testing.assert_close(grad, torch.tensor([2.0, 0.0]))


@pytest.mark.reference
def test_same_loss_and_gradients_as_torchjd_imtll() -> None:
    """Against torchjd 0.18's IMTLL: value, d/dL and d/ds on the same losses, both trained by SGD."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    reference = scalarization.IMTLL(3)
    imtl = mtlzoo.create("imtl_l", num_tasks=3)
    optimizers = [torch.optim.SGD(reference.parameters(), lr=0.05), torch.optim.SGD(imtl.parameters(), lr=0.05)]
    for seed in range(6):
        losses = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 3.0, 9.0])
        leaf = losses.clone().requires_grad_()
        value = reference(leaf)
        expected_weights = torch.autograd.grad(value, leaf, retain_graph=True)[0]
        mine = imtl.scalarize(losses)
        torch.testing.assert_close(mine.detach(), value.detach())
        torch.testing.assert_close(imtl.weights(losses), expected_weights)
        for optimizer in optimizers:
            optimizer.zero_grad()
        value.backward()
        mine.backward()
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(imtl.log_scales, reference.log_scale)


def test_the_scales_learn_from_the_objective_through_the_wrapper() -> None:
    """d/ds of sum_k exp(s_k) L_k - s_k with the losses held constant; the model gets sum_k exp(s_k) dL_k."""
    torch.manual_seed(0)
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, "imtl_l")
    with torch.no_grad():
        mtl.strategy.log_scales.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x, targets = batch(3)
    scales = torch.exp(mtl.strategy.log_scales.detach())
    expected = torch.autograd.grad((scales * torch.stack(mse_losses(model(x), targets))).sum(),
                                   list(model.parameters()))
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses)
    torch.testing.assert_close(mtl.strategy.log_scales.grad, scales * torch.stack(losses).detach() - 1)
    for param, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)


def test_on_the_regression_the_scales_go_to_the_inverse_losses() -> None:
    """The paper's fixed point exp(s_k) L_k = 1: the smallest-loss task gets the largest weight, in scale order."""
    run = _regression.trained("imtl_l")
    weights = run.weights[-1]
    assert float(weights[0]) > 1 > float(weights[1]) > float(weights[2])
