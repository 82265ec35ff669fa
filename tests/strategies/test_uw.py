"""UW, uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): sum_k exp(-s_k) L_k / 2 + s_k / 2."""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model
from tests.strategies import _regression


def test_worked_example_by_hand() -> None:
    """s = (0, log 2, -log 2), L = (1, 2, 3): total = 1/2 + (1/2 + log2 / 2) + (3 - log2 / 2) = 4, w = exp(-s) / 2 =
    (1/2, 1/4, 1), and d total / d s = (1 - exp(-s) L) / 2 = (0, 0, -5/2)."""
    uw = mtlzoo.create("uw", num_tasks=3)
    with torch.no_grad():
        uw.log_variances.copy_(torch.tensor([0.0, math.log(2), -math.log(2)]))
    losses = torch.tensor([1.0, 2.0, 3.0])
    total = uw.scalarize(losses)
    torch.testing.assert_close(total.detach(), torch.tensor(4.0))
    torch.testing.assert_close(uw.weights(losses), torch.tensor([0.5, 0.25, 1.0]))
    (grad,) = torch.autograd.grad(total, uw.log_variances)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -2.5]))


@pytest.mark.reference
def test_same_loss_and_gradients_as_torchjd_uw() -> None:
    """Against torchjd 0.18's UW (same form, log-variances at 0): value, d/dL and d/ds on the same sequence of losses,
    both trained by SGD on their own objective."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    reference = scalarization.UW(3)
    uw = mtlzoo.create("uw", num_tasks=3)
    optimizers = [torch.optim.SGD(reference.parameters(), lr=0.1), torch.optim.SGD(uw.parameters(), lr=0.1)]
    for seed in range(6):
        losses = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * torch.tensor([1.0, 10.0, 100.0])
        leaf = losses.clone().requires_grad_()
        value = reference(leaf)
        expected_weights = torch.autograd.grad(value, leaf, retain_graph=True)[0]
        mine = uw.scalarize(losses)
        torch.testing.assert_close(mine.detach(), value.detach())
        torch.testing.assert_close(uw.weights(losses), expected_weights)
        for optimizer in optimizers:
            optimizer.zero_grad()
        value.backward()
        mine.backward()
        torch.testing.assert_close(uw.log_variances.grad, reference.log_var.grad)
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(uw.log_variances, reference.log_var)


def test_the_log_variances_learn_from_the_objective_and_an_absent_task_gets_no_gradient() -> None:
    """Through MTLWrapper: d/ds of sum_k exp(-s_k) L_k / 2 + s_k / 2 over the present tasks, by plain autograd."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "uw")
    with torch.no_grad():
        mtl.strategy.log_variances.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x, targets = batch(3)
    losses = mse_losses(mtl(x), targets)
    values = torch.stack(losses).detach()
    s = mtl.strategy.log_variances.detach()
    expected = 0.5 - 0.5 * torch.exp(-s) * values
    expected[1] = 0.0
    mtl.backward([losses[0], None, losses[2]])
    torch.testing.assert_close(mtl.strategy.log_variances.grad, expected)


def test_on_the_regression_the_weight_falls_as_the_loss_grows() -> None:
    """The paper's prediction (sigma_k^2 -> L_k, w_k = 1 / (2 sigma_k^2)): the smallest-loss task gets the largest
    weight, in the order of the loss scales 1, 1e2, 1e4."""
    run = _regression.trained("uw")
    weights = run.weights[-1]
    assert float(weights[0]) > float(weights[1]) > float(weights[2])
    assert float(weights[0]) > 0.5 > float(weights[1])  # away from the initial 1/2, each way
