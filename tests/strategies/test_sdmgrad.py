"""SDMGrad (Xiao et al., NeurIPS 2023): the authors' inner loop, a worked example, its inner problem, its settings.

References: the authors' ``SDMGrad.sdmgrad`` (OptMN-Lab/sdmgrad, methods/weight_methods.py) re-run here as they
run it, with ``torch.optim.SGD(lr=10, momentum=0.5)`` and a projection onto the simplex after each of 20 steps,
warm-started across steps; the paper's inner problem, ``min_{w in simplex} ||J^T (w + λ w̃)||^2``, which is MGDA's
on the rows ``g_k + λ g_0`` (solved exactly by mtlzoo.solvers.min_norm_simplex). torchjd 0.18's SDMGradWeighting is
in test_multibatch_reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.solvers import min_norm_simplex


def authors_projection(v: np.ndarray) -> np.ndarray:
    """Their ``euclidean_proj_simplex`` (Duchi et al.'s sort), written out."""
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > (cssv - 1))[0][-1]
    return np.maximum(v - (cssv[rho] - 1) / (rho + 1.0), 0)


def authors_step(w: torch.Tensor, zeta: torch.Tensor, xi: torch.Tensor, xi_prime: torch.Tensor,
                 lamda: float = 0.3, niter: int = 20) -> torch.Tensor:
    """Their ``sdmgrad`` on K x n rows (they hold n x K columns), then ``overwrite_grad``'s factor K."""
    product = xi @ xi_prime.T
    scale = torch.mean(torch.sqrt(torch.diag(product) + 1e-4))
    product = product / scale.pow(2)
    mean_products = torch.mean(product, dim=1)
    w.requires_grad = True
    optimizer = torch.optim.SGD([w], lr=10, momentum=0.5)
    for _ in range(niter):
        optimizer.zero_grad()
        w.grad = torch.mv(product, w.detach()) + lamda * mean_products
        optimizer.step()
        w.data.copy_(torch.from_numpy(authors_projection(w.data.numpy())))
    w.requires_grad = False
    g0, gw = zeta.mean(0), (zeta * w.view(-1, 1)).sum(0)
    return zeta.shape[0] * (gw + lamda * g0) / (1 + lamda)


def test_equals_the_authors_loop_over_steps() -> None:
    """Four steps of three fresh batches each (positive diagonals, where their scale is defined), float64: the
    same update, the weights carried from step to step as their ``self.w``. A rounding difference can grow through
    the 20 inner steps (each multiplies it by up to 1 + η ||A|| / s^2 before the projection, about 30 here): up to
    1e-10 of the weights was seen, so the bound is 1e-8."""
    generator = torch.Generator().manual_seed(0)
    sdmgrad = mtlzoo.create("sdmgrad", num_tasks=4)
    w = torch.full((4,), 0.25, dtype=torch.float64)
    for _ in range(4):
        base = torch.randn(4, 30, generator=generator, dtype=torch.float64)
        zeta, xi, xi_prime = (base + 0.3 * torch.randn(4, 30, generator=generator, dtype=torch.float64)
                              for _ in range(3))
        ours = sdmgrad.aggregate(zeta, torch.ones(4, dtype=torch.float64), more_batches=[xi, xi_prime])
        sdmgrad.advance()
        theirs = authors_step(w, zeta, xi, xi_prime)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-8 * float(zeta.norm()))
        torch.testing.assert_close(sdmgrad.weights, w, rtol=0, atol=1e-8)


def test_one_inner_step_by_hand() -> None:
    """n_iter = 1, lr = 0.1: A = ξ ξ'^T = [[2, 1], [0, 1]], s = (sqrt(2.0001) + sqrt(1.0001)) / 2; the step
    w = Π(w_0 - 0.1 A (w_0 + 0.15) / s^2), and d = 2 ζ^T (w + 0.15) / 1.3."""
    zeta, xi = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 1.0], [0.0, 1.0]],
                                                                                       dtype=torch.float64)
    sdmgrad = mtlzoo.create("sdmgrad", num_tasks=2, n_iter=1, lr=0.1)
    update = sdmgrad.aggregate(zeta, torch.ones(2, dtype=torch.float64), more_batches=[xi, torch.eye(2).double()])
    scale = (2.0001**0.5 + 1.0001**0.5) / 2
    moved = np.array([0.5, 0.5]) - 0.1 * np.array([3 * 0.65, 0.65]) / scale**2
    w = moved + (1 - moved.sum()) / 2  # both stay positive: the projection shifts them equally
    torch.testing.assert_close(update, torch.from_numpy(zeta.numpy().T @ (2 * (w + 0.15) / 1.3)))


@pytest.mark.parametrize("lambda_", [0.0, 0.3, 2.0])
def test_its_weights_settle_at_the_papers_inner_problem(lambda_: float) -> None:
    """On one Jacobian with a small inner learning rate, the warm-started inner steps settle at
    argmin_w ||J^T (w + λ w̃)||^2 over the simplex: MGDA's weights of the rows g_k + λ g_0 (λ = 0: MGDA itself),
    which ls (w = 1/K) is not."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [4.0]],
                                                                                       dtype=torch.float64)
    sdmgrad = mtlzoo.create("sdmgrad", num_tasks=3, lambda_=lambda_, lr=0.05)
    for _ in range(300):
        sdmgrad.aggregate(matrix, torch.ones(3, dtype=torch.float64), more_batches=[matrix, matrix])
        sdmgrad.advance()
    shifted = matrix + lambda_ * matrix.mean(0)
    expected = min_norm_simplex(shifted @ shifted.T)
    torch.testing.assert_close(sdmgrad.weights, expected, rtol=0, atol=1e-7)
    assert float((expected - 1 / 3).abs().max()) > 0.05


def test_a_large_lambda_tends_to_the_mean_gradient() -> None:
    """d = K (g_w + λ g_0) / (1 + λ) -> K g_0 = the sum of the rows (ls) as λ grows."""
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    update = mtlzoo.create("sdmgrad", num_tasks=3, lambda_=1e6).aggregate(
        matrix, torch.ones(3, dtype=torch.float64), more_batches=[matrix, matrix])
    torch.testing.assert_close(update, matrix.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("option", "value"), [("lambda_", -0.1), ("lr", 0.0), ("momentum", 1.0), ("momentum", -0.5),
                                               ("n_iter", 0), ("n_iter", 2.5)])
def test_settings_are_checked(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{option}` should be"):
        mtlzoo.create("sdmgrad", num_tasks=2, **{option: value})
