"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): worked examples and the authors' normalisations.

References: examples solved by hand from the paper's problem (the minimum-norm point of the hull);
``gradient_normalizers`` of the authors' code (isl-org/MultiObjectiveOptimization) for the
normalisations. Exactness against quadprog is in tests/test_solvers.py, torchjd parity in
test_surgery_reference.py, the claimed properties in test_properties.py.
"""

from __future__ import annotations

import pytest
import torch

import mtlzoo


def aggregate(matrix: torch.Tensor, losses: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    losses = torch.ones(matrix.shape[0]) if losses is None else losses
    return mtlzoo.create("mgda", num_tasks=matrix.shape[0], **kwargs).aggregate(matrix, losses)


def test_worked_examples() -> None:
    """By hand: g1 = (10, 0), g2 = (0, 1): the nearest point of the segment is (10, 100) / 101; a gradient
    inside the other's reach wins alone; opposite gradients give exactly 0."""
    torch.testing.assert_close(aggregate(torch.tensor([[10.0, 0.0], [0.0, 1.0]])), torch.tensor([10.0, 100.0]) / 101)
    torch.testing.assert_close(aggregate(torch.tensor([[1.0, 0.0], [1.0, 1.0]])), torch.tensor([1.0, 0.0]))
    assert torch.equal(aggregate(torch.tensor([[2.0, 1.0], [-4.0, -2.0]])), torch.zeros(2))


def test_normalisations_follow_the_authors_code() -> None:
    """Weights of g_k / n_k applied to the raw g_k: "l2" (n = ||g||) makes g1 = (10, 0), g2 = (0, 1) equal,
    so w = (1/2, 1/2) and d = (5, 1/2); "loss" divides by L_k; "loss+" by L_k ||g_k||."""
    matrix = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(aggregate(matrix, normalization="l2"), torch.tensor([5.0, 0.5]))
    # "loss": g / L = (1, 0) and (0, 1) for L = (10, 1): again w = (1/2, 1/2)
    torch.testing.assert_close(aggregate(matrix, torch.tensor([10.0, 1.0]), normalization="loss"),
                               torch.tensor([5.0, 0.5]))
    # "loss+": g / (L ||g||) = (1/2, 0) and (0, 1) for L = (2, 1): nearest point (4, 1) / 5 of the two, w = (4/5, 1/5)
    torch.testing.assert_close(aggregate(matrix, torch.tensor([2.0, 1.0]), normalization="loss+"),
                               torch.tensor([8.0, 0.2]))
    assert "non_conflicting" not in mtlzoo.create("mgda", num_tasks=2, normalization="l2").properties
    with pytest.raises(ValueError, match="Parameter `normalization`"):
        mtlzoo.create("mgda", num_tasks=2, normalization="l1")


def test_mgda_ub_is_mgda_on_the_representation() -> None:
    matrix = torch.randn(3, 2, 5)
    ub = mtlzoo.create("mgda_ub", num_tasks=3)
    assert ub.request.where == "representation" and mtlzoo.create("mgda", num_tasks=3).request.where == "parameters"
    mgda = mtlzoo.create("mgda", num_tasks=3, target="representation")
    torch.testing.assert_close(ub.aggregate(matrix, torch.ones(3)), mgda.aggregate(matrix, torch.ones(3)))
    with pytest.raises(ValueError, match="Parameter `target`"):
        mtlzoo.create("mgda_ub", num_tasks=3, target="parameters")


def test_loss_normalisation_divides_by_the_signed_loss_as_the_authors() -> None:
    """Issue 19, item 3: the authors' gradient_normalizers divide by L_k itself, so a negative loss flips that task's
    normalised gradient. By hand: g = (1, 1), (0, 1) with L = (-1, 1) gives g / L = (-1, -1), (0, 1), whose nearest
    hull point is at w = (0.4, 0.6): d = 0.4 (1, 1) + 0.6 (0, 1) = (0.4, 1). Dividing by |L_k| (before the fix) gave
    w = (0, 1), d = (0, 1)."""
    matrix = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    losses = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(aggregate(matrix, losses, normalization="loss"),
                               torch.tensor([0.4, 1.0], dtype=torch.float64))
    torch.testing.assert_close(aggregate(matrix, losses, normalization="loss+"), _loss_plus(matrix, losses))


def _loss_plus(matrix: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """By hand for "loss+": the normalised rows g_k / (L_k ||g_k||) span a segment whose nearest point to 0 is at the
    minimiser t of a quadratic (clamped to [0, 1]); its weights (1 - t, t) apply to the raw rows."""
    first, second = matrix[0] / (losses[0] * matrix[0].norm()), matrix[1] / (losses[1] * matrix[1].norm())
    difference = second - first
    t = float((-(first @ difference) / (difference @ difference)).clamp(0, 1))
    return (1 - t) * matrix[0] + t * matrix[1]


def test_the_normalisation_is_a_modifier_any_aggregator_takes() -> None:
    """Issue 18, item 3: MGDA's normalisation is the function the Normalize modifier applies; wrapped around plain
    MGDA it gives MGDA(normalization=...)'s weights, and it wraps another aggregator (UPGrad) as well, whose
    weights are then those of the normalised rows (reference: UPGrad on the rows divided by ||g_k||)."""
    from mtlzoo.roles.modifiers import Normalize, modify
    generator = torch.Generator().manual_seed(4)
    matrix = torch.randn(3, 6, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [10.0], [0.1]],
                                                                                          dtype=torch.float64)
    losses = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    gramian = matrix @ matrix.T
    for by in ("l2", "loss", "loss+"):
        wrapped = modify("normalize", mtlzoo.create("mgda", num_tasks=3), by=by).gramian_weights(gramian, losses)
        built_in = mtlzoo.create("mgda", num_tasks=3, normalization=by).gramian_weights(gramian, losses)
        torch.testing.assert_close(wrapped, built_in, rtol=0, atol=1e-12)
    units = matrix / matrix.norm(dim=1, keepdim=True)
    expected = mtlzoo.create("upgrad", num_tasks=3).gramian_weights(units @ units.T, losses)
    torch.testing.assert_close(Normalize(mtlzoo.create("upgrad", num_tasks=3), "l2").gramian_weights(gramian, losses),
                               expected)
    with pytest.raises(ValueError, match="Parameter `by`"):
        Normalize(mtlzoo.create("upgrad", num_tasks=3), "l1")
