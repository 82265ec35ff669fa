"""GradNorm's synthetic regression (``gradnorm_synthetic``).

Reference: Chen et al., *GradNorm*, ICML 2018, section 4: ``f_i(x) = sigma_i tanh((B + eps_i) x)``,
inputs 250, outputs 100, ``B ~ N(0, 10)`` shared, ``eps_i ~ N(0, 3.5)`` per task, sigma (1, 100) for
T = 2, a 4-layer ReLU trunk of 100 units and one affine head per task, alpha = 0.12. The checks
below are consequences of that definition computed by hand, and the paper's claim (equal weights
starve the small-sigma task).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.harness import train_and_evaluate
from mtlzoo.harness.problems import GradNormSynthetic, create_problem

SMALL = {"train_size": 2_000, "test_size": 1_000}


def test_targets_are_scaled_tanh_of_a_shared_plus_own_projection() -> None:
    """Sign agreement between two tasks' targets is 1/2 + arcsin(rho)/pi with rho = 10^2 / (10^2 + 3.5^2).

    For a Gaussian pair with correlation rho, P(same sign) = 1/2 + arcsin(rho)/pi: 0.849 here. Without
    the shared B it would be 1/2; with the two standard deviations swapped, 0.535.
    """
    problem = GradNormSynthetic(**SMALL)
    y = problem.data["y_train"]
    assert y.shape == (2, 2_000, 100) and problem.data["x_train"].shape == (2_000, 250)
    torch.testing.assert_close(problem.data["x_train"].norm(dim=1), torch.ones(2_000))
    assert float((y[0].abs() <= 1).float().mean()) == 1.0  # sigma_0 = 1: |tanh| <= 1
    assert 1 < float(y[1].abs().max()) <= 100  # sigma_1 = 100
    rho = 10.0 ** 2 / (10.0 ** 2 + 3.5 ** 2)
    expected = 0.5 + math.asin(rho) / math.pi
    same_sign = float((torch.sign(y[0]) == torch.sign(y[1])).float().mean())
    assert same_sign == pytest.approx(expected, abs=0.02)
    ratio = float(y[1].var() / y[0].var())
    assert ratio == pytest.approx(100.0 ** 2, rel=0.05)  # the losses differ by sigma_1^2 / sigma_0^2


def test_data_is_fixed_by_data_seed_not_by_the_run() -> None:
    a, b = GradNormSynthetic(**SMALL), GradNormSynthetic(**SMALL)
    torch.testing.assert_close(a.data["y_test"], b.data["y_test"], rtol=0, atol=0)
    other = GradNormSynthetic(**SMALL, data_seed=1)
    assert not torch.equal(a.data["y_test"], other.data["y_test"])


def test_model_is_the_papers_trunk_and_heads() -> None:
    model = GradNormSynthetic(num_tasks=10).build_model()
    linears = [m for m in model.backbone if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(250, 100)] + [(100, 100)] * 3
    assert sum(isinstance(m, nn.ReLU) for m in model.backbone) == 4
    assert len(model.heads) == 10 and all(isinstance(h, nn.Linear) and h.out_features == 100 for h in model.heads)


def test_the_papers_sigmas_and_alpha() -> None:
    assert create_problem("gradnorm_synthetic").scales == (1.0, 100.0)
    ten = create_problem("gradnorm_synthetic", num_tasks=10)
    assert len(ten.scales) == 10 and min(ten.scales) == 3.0 and max(ten.scales) == 81.0
    assert ten.strategy_options(mtlzoo.get_strategy("rotograd_norm")) == {"alpha": 0.12}
    with pytest.raises(ValueError, match="sigma for T = 2 and T = 10"):
        GradNormSynthetic(num_tasks=3)
    assert GradNormSynthetic(num_tasks=3, sigmas=[1, 2, 3]).scales == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="`sigmas`"):
        GradNormSynthetic(num_tasks=2, sigmas=[1.0, -1.0])


def test_an_epoch_visits_every_example_once_in_a_seeded_order() -> None:
    problem = GradNormSynthetic(**SMALL, batch_size=100)
    first = [x for x, _ in problem.epoch(torch.Generator().manual_seed(3))]
    again = [x for x, _ in problem.epoch(torch.Generator().manual_seed(3))]
    other = [x for x, _ in problem.epoch(torch.Generator().manual_seed(4))]
    assert len(first) == problem.steps_per_epoch == 20
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    seen = torch.cat(first)
    assert torch.equal(seen[seen[:, 0].argsort()], problem.data["x_train"][problem.data["x_train"][:, 0].argsort()])


def test_equal_weights_starve_the_small_sigma_task() -> None:
    """The paper's premise: with w = (1, 1) the sigma = 100 task dominates; inverse-variance weights
    (1, 1e-4), which equalise the loss scales, let the sigma = 1 task learn much more."""
    problem = GradNormSynthetic(**SMALL)
    equal = train_and_evaluate(problem, "ls", seed=0, steps=300)
    balanced = train_and_evaluate(problem, "ls", seed=0, steps=300, weights=[1.0, 1e-4])
    nmse_equal, nmse_balanced = equal[0] / 1.0, balanced[0] / 1.0
    assert nmse_balanced < nmse_equal - 0.05
