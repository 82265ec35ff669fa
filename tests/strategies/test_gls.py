"""GLS, the geometric mean of the losses (Chennupati et al., CVPR-W 2019): w_k = GM / (K L_k)."""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from tests.strategies import _regression


def test_worked_example_by_hand() -> None:
    """From the definition: L = (1, 4, 16) gives GM = 64^(1/3) = 4 and w = 4 / (3 L) = (4/3, 1/3, 1/12)."""
    gls = mtlzoo.create("gls", num_tasks=3)
    losses = torch.tensor([1.0, 4.0, 16.0])
    torch.testing.assert_close(gls.scalarize(losses), torch.tensor(4.0))
    torch.testing.assert_close(gls.weights(losses), torch.tensor([4 / 3, 1 / 3, 1 / 12]))


def test_no_overflow_where_the_product_would() -> None:
    """The mean is taken in log space: losses of 1e30 (product 1e90 overflows float32) give finite weights."""
    gls = mtlzoo.create("gls", num_tasks=3)
    losses = torch.full((3,), 1e30)
    torch.testing.assert_close(gls.scalarize(losses), torch.tensor(1e30))
    torch.testing.assert_close(gls.weights(losses), torch.full((3,), 1 / 3))


@pytest.mark.reference
def test_same_value_and_gradients_as_torchjd_geometric_mean() -> None:
    """Against torchjd 0.18's GeometricMean (the same method): value and d/dL on random positive losses."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    gls = mtlzoo.create("gls", num_tasks=4)
    for seed in range(5):
        losses = torch.rand(4, generator=torch.Generator().manual_seed(seed)) * 10 ** torch.arange(4.0) + 1e-3
        leaf = losses.clone().requires_grad_()
        reference = scalarization.GeometricMean()(leaf)
        (gradient,) = torch.autograd.grad(reference, leaf)
        torch.testing.assert_close(gls.scalarize(losses), reference.detach())
        torch.testing.assert_close(gls.weights(losses), gradient)


def test_on_the_regression_the_weights_are_proportional_to_inverse_losses() -> None:
    """The issue's direction for GLS: w_k L_k equal across tasks at every step (= GM / K)."""
    run = _regression.trained("gls")
    for losses, weights in zip(run.losses, run.weights):
        products = weights * losses
        torch.testing.assert_close(products, products.mean().expand(3))
    assert float(run.weights[-1][0] / run.weights[-1][2]) > 100
