"""IMTL-G and IMTL (Liu et al., ICLR 2021): equal projections, the paper's closed form, the hybrid method.

References: the paper's closed form ``a_{2:K} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2:K}``
(Section 3.2), written out here; its defining property (equal projections of the update on every
task's unit gradient, weights summing to 1); Algorithm 1 for the hybrid IMTL.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import StepInputs
from mtlzoo.strategies.imtl_g import equal_projection_weights
from mtlzoo.strategies.imtl_l import IMTLL
from tests.helpers import batch, mse_losses, small_model


def closed_form(matrix: torch.Tensor) -> torch.Tensor:
    """The paper's formula, literally (linearly independent rows)."""
    units = matrix / matrix.norm(dim=1, keepdim=True)
    differences, unit_differences = matrix[0] - matrix[1:], units[0] - units[1:]
    rest = matrix[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    return torch.cat([(1 - rest.sum()).unsqueeze(0), rest])


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_the_papers_closed_form_and_equal_projections(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    matrix = torch.randn(size, 20, generator=generator, dtype=torch.float64) * torch.logspace(0, 2, size).unsqueeze(1)
    weights = equal_projection_weights(matrix @ matrix.T)
    torch.testing.assert_close(weights, closed_form(matrix))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    update = mtlzoo.create("imtl_g", num_tasks=size).aggregate(matrix, torch.ones(size, dtype=torch.float64))
    projections = (matrix / matrix.norm(dim=1, keepdim=True)) @ update
    torch.testing.assert_close(projections, projections[0].expand(size))
    torch.testing.assert_close(update, weights @ matrix)


def test_linearly_dependent_rows_keep_equal_projections() -> None:
    """g1 = e1, g2 = -2 e1: the only update with equal projections and weights summing to 1 is 0 (a = (2/3, 1/3));
    torchjd's G^+ n / 1^T G^+ n gives -5 e1 here, which increases L_1 (computed below from its formula)."""
    matrix = torch.tensor([[1.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    weights = equal_projection_weights(matrix @ matrix.T)
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(weights @ matrix, torch.zeros(2, dtype=torch.float64))
    gramian = matrix @ matrix.T
    theirs = torch.linalg.pinv(gramian) @ gramian.diagonal().sqrt()
    torch.testing.assert_close((theirs / theirs.sum()) @ matrix, torch.tensor([-5.0, 0.0], dtype=torch.float64))


def test_identical_rows_share_and_a_zero_row_takes_no_part() -> None:
    row = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(equal_projection_weights(torch.outer(torch.ones(3, dtype=torch.float64), torch.ones(3,
                               dtype=torch.float64)) * 9), torch.full((3,), 1 / 3, dtype=torch.float64))
    matrix = torch.stack([row, torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, -1.0, 1.0],
                                                                                 dtype=torch.float64)])
    weights = equal_projection_weights(matrix @ matrix.T)
    assert weights[1] == 0
    torch.testing.assert_close(weights, torch.cat([closed_form(matrix[[0, 2]])[:1], weights.new_zeros(1),
                                                   closed_form(matrix[[0, 2]])[1:]]))
    assert torch.equal(equal_projection_weights(torch.zeros(2, 2)), torch.zeros(2))


def test_imtl_g_follows_the_paper_on_the_representation_by_default() -> None:
    assert mtlzoo.create("imtl_g", num_tasks=2).request.where == "representation"
    assert mtlzoo.create("imtl_g", num_tasks=2, target="parameters").request.where == "parameters"


def test_imtl_is_imtl_l_scales_with_imtl_g_weights() -> None:
    """Algorithm 1: the heads learn from e^s L, the scales from sum (e^s L - s) with L held, the shared part from
    IMTL-G's weights of the gradients of e^s L (one IMTL-L implementation, the imtl_l strategy's)."""
    strategy = mtlzoo.create("imtl", num_tasks=3)
    assert isinstance(strategy.loss_scales, IMTLL) and strategy.info.learnable
    with torch.no_grad():
        strategy.loss_scales.log_scales.copy_(torch.tensor([0.0, 1.0, -0.5]))
    losses = torch.tensor([2.0, 0.5, 3.0])
    inputs = StepInputs(losses, torch.arange(3), 3)
    torch.testing.assert_close(strategy.loss_weights(inputs), torch.exp(torch.tensor([0.0, 1.0, -0.5])))
    objective = strategy.loss_objective(losses, torch.arange(3))
    objective.backward()
    scales = torch.exp(torch.tensor([0.0, 1.0, -0.5]))
    torch.testing.assert_close(strategy.loss_scales.log_scales.grad, scales * losses - 1)
    matrix = torch.randn(3, 7, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    expected = mtlzoo.create("imtl_g", num_tasks=3).aggregate(scales.double().unsqueeze(1) * matrix, ones)
    torch.testing.assert_close(strategy.aggregate(matrix, losses.double()), expected)
    assert "permutation_invariant" not in strategy.properties


def test_imtl_trains_its_scales_through_the_wrapper() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "imtl")
    optimizer = torch.optim.SGD([{"params": list(mtl.model_parameters())},
                                 {"params": mtl.strategy_parameters(), "lr": 0.1}], lr=0.01)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    losses = torch.stack(mse_losses(mtl(x), targets)).detach()
    torch.testing.assert_close(mtl.strategy.loss_scales.log_scales.grad, losses - 1, rtol=1e-4, atol=1e-5)
    mtl.step(optimizer)
    assert bool((mtl.strategy.loss_scales.log_scales != 0).all())


def test_a_float32_step_gives_the_papers_weights_on_nearly_dependent_gradients() -> None:
    """Issue 19, item 2: rows c v + 2e-3 noise (c = 1, 3, 0.5; n = 200), cast to float32 as a step computes them.
    Reference: the paper's closed form a_{2:K} = g_1 U^T (D U^T)^{-1} in float64 (closed_form above). The
    float32 Gramian still determines the weights (the cosines' smallest singular value, ~1e-5, is far above
    float32's rounding): the float32 step's weights are the paper's to the float32 Gramian's rounding
    amplified by that conditioning (~1e-2), and its update is as long as the paper's. Before the fix the
    solver's cut-off of 10 (K+1) eps dropped that component: weights [0.388, 0.170, 0.442], an update 1.58x
    the paper's."""
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(200, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 200, generator=generator, dtype=torch.float64)
    rows = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)[:, None] * direction + 2e-3 * noise
    expected = closed_form(rows)
    single = rows.float()
    weights = mtlzoo.create("imtl_g", num_tasks=3).gramian_weights(single @ single.T, torch.ones(3))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), expected, rtol=0, atol=1e-2)
    ratio = float((weights.double() @ rows).norm() / (expected @ rows).norm())
    assert abs(ratio - 1) < 1e-2
