"""Parity of MoDo and SDMGrad with torchjd 0.18 (the ``reference`` extra); MoCo is not in torchjd (test_moco.py).

torchjd's ``MoDoWeighting`` and ``SDMGradWeighting`` take the K x K product of two independent batches' Jacobians
and keep their weights from call to call; here each runs over several steps of fresh random batches, mtlzoo's
state advanced after each. The conventions that differ, each stated where it is used:

- MoDo: torchjd returns ``λ_{t+1}``; mtlzoo's update is ``(J_1 + J_2)^T λ_{t+1} / 2`` (the paper's, torchjd's own
  two-batch example backs the mean of both batches' losses by these weights);
- SDMGrad: torchjd returns ``(w + λ w̃) / (1 + λ)``; mtlzoo multiplies by K (the authors' code) and applies it to
  the update batch ``ζ``. torchjd scales the product by ``(mean_k sqrt(max(A_kk, 0)))^2 + 1e-8``, the authors (and
  mtlzoo) by ``(mean_k sqrt(max(A_kk, 0) + 1e-4))^2``: on rows of norm around 1e4 the two scales agree to about
  1e-12 relative, and the updates to 1e-8 after 20 inner steps (which can amplify a difference).
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo

pytestmark = pytest.mark.reference
aggregation = pytest.importorskip("torchjd.aggregation")

SHAPES = ((2, 10), (3, 200), (5, 50), (8, 1000))


def steps(size: int, width: int, count: int, seed: int, scale: float = 1.0) -> list[list[torch.Tensor]]:
    """``count`` steps of three batches' Jacobians around a common one (independent draws of the same gradients)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(size, width, generator=generator, dtype=torch.float64)
    base[1:] -= 0.6 * base[0]  # conflicting tasks
    return [[scale * (base + 0.5 * torch.randn(size, width, generator=generator, dtype=torch.float64))
             for _ in range(3)] for _ in range(count)]


@pytest.mark.parametrize(("size", "width"), SHAPES)
@pytest.mark.parametrize(("gamma", "rho"), [(0.1, 0.1), (0.01, 0.0)])
def test_modo_equals_torchjd_weights_applied_to_both_batches(size: int, width: int, gamma: float, rho: float) -> None:
    """Five steps: mtlzoo's update = (J_1 + J_2)^T λ / 2 with torchjd's λ from J_1 J_2^T, to 1e-12 of ||J||."""
    ours = mtlzoo.create("modo", num_tasks=size, gamma=gamma, rho=rho)
    theirs = aggregation.MoDoWeighting(gamma=gamma, rho=rho)
    for first, second, _ in steps(size, width, 5, seed=size):
        update = ours.aggregate(first, torch.ones(size, dtype=torch.float64), more_batches=[second])
        ours.advance()
        weights = theirs(first @ second.T)
        expected = (first + second).T @ weights / 2
        torch.testing.assert_close(update, expected, rtol=0, atol=1e-12 * float(first.norm()))
        torch.testing.assert_close(ours.weights, weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("size", "width"), SHAPES)
@pytest.mark.parametrize("lambda_", [0.0, 0.3, 1.0])
def test_sdmgrad_equals_torchjd_times_k_on_the_update_batch(size: int, width: int, lambda_: float) -> None:
    """Five steps of (ζ, ξ, ξ'): mtlzoo's update = K J_ζ^T (torchjd's weights from J_ξ J_ξ'^T), same defaults
    (η = 10, μ = 0.5, 20 inner steps), rows of norm around 1e4 (see the module: the scales' 1e-4 and 1e-8)."""
    ours = mtlzoo.create("sdmgrad", num_tasks=size, lambda_=lambda_)
    theirs = aggregation.SDMGradWeighting(lambda_=lambda_)
    for zeta, xi, xi_prime in steps(size, width, 5, seed=size, scale=1e4 / width**0.5):
        update = ours.aggregate(zeta, torch.ones(size, dtype=torch.float64), more_batches=[xi, xi_prime])
        ours.advance()
        expected = size * theirs(xi @ xi_prime.T) @ zeta
        torch.testing.assert_close(update, expected, rtol=0, atol=1e-8 * float(zeta.norm()))
