"""Parity of the aggregators of issue 21 with torchjd 0.18 (the ``reference`` extra), on the core ones' Jacobians.

The same random float64 Jacobians as test_surgery_reference.py (K from 2 to 10, n up to 10^4; generic, conflicting,
aligned, rank-deficient, with a zero row), tolerances relative to ``||J||_F``. Conventions that differ, each stated
where it is used:

- ConFIG: none (torchjd's ``pinv`` of the unit rows, mtlzoo's pseudo-inverse of their cosines);
- FairGrad: mtlzoo follows the authors' code, ``K J^T w`` clipped to norm 1; torchjd returns ``J^T w``. Where the
  equations have no solution (a zero row, 0 in the rows' hull) mtlzoo warns and torchjd's solver stops anywhere:
  those cases are pinned in test_fairgrad.py;
- PCD: none (both follow the authors' Algorithm 1, state included); mtlzoo warns where the constraints cannot hold;
- ExcessMTL: mtlzoo follows the authors' code (weights start at 1 and sum to K; the first step records the
  baselines and keeps the weights); torchjd starts at 1/K, and at its first call already takes the exponentiated
  step with the raw excess risks ``E^0``, and divides by ``E^0 + 1e-7``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mtlzoo
from mtlzoo.errors import SolverWarning
from tests.strategies.test_surgery_reference import KINDS, assert_near, cases, hull_contains_zero, ours, theirs

pytestmark = pytest.mark.reference
aggregation = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("kind", KINDS)
def test_config_equals_torchjd(kind: str) -> None:
    """Same update to 1e-10 of ||J||: the same formula, pinv(U) 1 = U^T C^+ 1 (cut-offs that agree on these rows)."""
    for matrix in cases(kind):
        assert_near(ours("config", matrix), theirs(aggregation.ConFIG, matrix), matrix, 1e-10)


def fair_residual(weights: torch.Tensor, matrix: torch.Tensor, alpha: float) -> float:
    """max_k |(G w)_k - w_k^(-1/alpha)| / w_k^(-1/alpha): how well w solves FairGrad's equations."""
    target = weights ** (-1 / alpha)
    return float(((matrix @ matrix.T @ weights - target) / target).abs().max())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", ["generic", "conflicting", "aligned", "rank_deficient"])
def test_fairgrad_equals_k_times_torchjd_then_clipped(kind: str, alpha: float) -> None:
    """Where the equations have a solution and torchjd's least_squares reaches it (relative residual below 1e-6):
    unclipped, mtlzoo = K x torchjd to 1e-6 of the update's norm; by default (max_norm = 1), that update clipped to
    norm 1. mtlzoo's own weights solve the equations to 1e-9 in every case."""
    compared = 0
    for matrix in cases(kind):
        if hull_contains_zero(matrix):
            continue
        size = matrix.shape[0]
        strategy = mtlzoo.create("fairgrad", num_tasks=size, alpha=alpha, max_norm=0.0)
        weights = strategy.inner.gramian_weights(matrix @ matrix.T, torch.ones(size, dtype=matrix.dtype)) / size
        assert fair_residual(weights, matrix, alpha) <= 1e-9
        reference = theirs(lambda alpha=alpha: lambda m: aggregation.FairGrad(alpha=alpha).gramian_weighting(m @ m.T),
                           matrix)
        if fair_residual(reference, matrix, alpha) > 1e-6:
            continue
        expected = size * reference @ matrix
        assert_near(ours("fairgrad", matrix, alpha=alpha, max_norm=0.0), expected, expected.reshape(1, -1), 1e-6)
        clipped = expected / max(1.0, float(expected.norm()))
        assert_near(ours("fairgrad", matrix, alpha=alpha), clipped, clipped.reshape(1, -1), 1e-6)
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize("tau", [0.02, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_pcd_equals_torchjd_over_several_steps(kind: str, tau: float) -> None:
    """Each shape's strategy and torchjd's PCD see the same Jacobians over four steps (the moving average of the
    squared norms carries over; mtlzoo advanced after each, as after an optimizer step): the same updates to 1e-10
    of ||J||, infeasible constraints included (both fall back to g_1; mtlzoo says so in a warning)."""
    for seed, matrix in enumerate(cases(kind)):
        size = matrix.shape[0]
        strategy = mtlzoo.create("pcd", num_tasks=size, tau=tau, beta=0.9)
        reference = aggregation.PCD(tau=tau, beta=0.9)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(4):
            scaled = matrix * (0.5 + torch.rand(size, 1, generator=generator, dtype=matrix.dtype))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SolverWarning)
                update = strategy.aggregate(scaled, torch.ones(size, dtype=matrix.dtype))
            strategy.advance()
            assert_near(update, reference(scaled), scaled, 1e-10)


def test_pcd_with_one_tau_per_secondary_equals_torchjd() -> None:
    """tau as a vector (one value per secondary task), in both: the same updates over three steps, to 1e-10."""
    taus = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    strategy = mtlzoo.create("pcd", num_tasks=5, tau=taus)
    reference = aggregation.PCD(tau=taus)
    for matrix in cases("conflicting")[2:3] * 3:
        update = strategy.aggregate(matrix, torch.ones(5, dtype=matrix.dtype))
        strategy.advance()
        assert_near(update, reference(matrix), matrix, 1e-10)


@pytest.mark.parametrize("kind", ["generic", "conflicting", "aligned", "rank_deficient"])
def test_excess_mtl_equals_torchjd_with_its_first_step_undone(kind: str) -> None:
    """torchjd's weights after step t are softmax(log(1/K) + eta (E^0 + sum_{s=2..t} E_s / (E^0 + 1e-7))); the
    authors' (mtlzoo's) are K softmax(eta sum_{s=2..t} E_s / E^0). So mtlzoo's = K softmax(log(torchjd's) - eta E^0),
    with E^0 read from torchjd, up to torchjd's 1e-7: the logits differ by eta sum_s (E_s / E^0) 1e-7 / E^0, below
    eta t r 1e-7 / min E^0 with r = 2 a bound on the ratios of these rows (at most 1 here: S grows faster than
    g^2), so the K weights (and J^T lambda, relative to ||J||) within K times that, over five steps. At the default
    eta = 1e-2 (a larger one saturates torchjd's softmax at its first step, where eta E^0 is of order n)."""
    eta = 1e-2
    for seed, matrix in enumerate(cases(kind)):
        size = matrix.shape[0]
        strategy = mtlzoo.create("excess_mtl", num_tasks=size, robust_step_size=eta)
        reference = aggregation.ExcessMTL(robust_step_size=eta)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(5):
            noisy = matrix + 0.3 * torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype)
            update = strategy.aggregate(noisy, torch.ones(size, dtype=matrix.dtype))
            strategy.advance()
            reference(noisy)
            weighting = reference.weighting
            expected = size * torch.softmax(torch.log(weighting._weights) - eta * weighting._initial_w, 0)
            bound = size * eta * 5 * 2 * 1e-7 / float(weighting._initial_w.min())
            torch.testing.assert_close(strategy.weights, expected, rtol=0, atol=bound)
            assert_near(update, expected @ noisy, noisy, bound)
