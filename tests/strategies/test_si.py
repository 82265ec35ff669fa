"""SI, the scale-invariant loss sum_k log L_k (Navon et al., ICML 2022): w_k = 1 / L_k."""

from __future__ import annotations

import math

import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model
from tests.strategies import _regression


def test_worked_example_by_hand() -> None:
    """From the definition: L = (0.5, 2, 4) gives total = log 0.5 + log 2 + log 4 = log 4 and w = (2, 1/2, 1/4)."""
    si = mtlzoo.create("si", num_tasks=3)
    losses = torch.tensor([0.5, 2.0, 4.0])
    torch.testing.assert_close(si.scalarize(losses), torch.tensor(math.log(4.0)))
    torch.testing.assert_close(si.weights(losses), torch.tensor([2.0, 0.5, 0.25]))


def test_closed_form_weights_are_the_derivative_of_the_total() -> None:
    """w_k = d total / d L_k, against autograd of sum_k log L_k."""
    si = mtlzoo.create("si", num_tasks=3)
    losses = torch.tensor([0.3, 7.0, 1e4], requires_grad=True)
    (expected,) = torch.autograd.grad(si.scalarize(losses), losses)
    torch.testing.assert_close(si.weights(losses.detach()), expected)


def test_scaling_a_loss_changes_nothing() -> None:
    """The paper's property: L_k -> c L_k (and its gradient with it) leaves the update unchanged."""
    si = mtlzoo.create("si", num_tasks=3)
    grads, losses = torch.randn(3, 5), torch.tensor([0.5, 2.0, 4.0])
    scale = torch.tensor([1.0, 1e3, 1e-3]).view(3, 1)
    torch.testing.assert_close(si.aggregate(grads * scale, losses * scale.view(3)), si.aggregate(grads, losses))


def test_the_model_learns_from_the_sum_of_log_losses() -> None:
    """Through MTLWrapper, every parameter's gradient is that of sum_k log L_k by plain autograd."""
    torch.manual_seed(0)
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, "si")
    x, targets = batch(3)
    expected = torch.autograd.grad(torch.stack(mse_losses(model(x), targets)).log().sum(), list(model.parameters()))
    mtl.backward(mse_losses(mtl(x), targets))
    for param, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)


def test_on_the_regression_the_weights_are_inverse_losses() -> None:
    """The issue's direction for SI: w_k proportional to 1 / L_k at every step (w_k L_k = 1), loss scales 1 to 1e4."""
    run = _regression.trained("si")
    for losses, weights in zip(run.losses, run.weights):
        torch.testing.assert_close(weights * losses, torch.ones(3))
    assert float(run.weights[-1][0] / run.weights[-1][2]) > 100
