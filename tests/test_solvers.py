"""mtlzoo.solvers and the Gramian helpers of mtlzoo.linalg, each on its own.

References: worked examples solved by hand; the problems' optimality (KKT) conditions on random
degenerate Gramians; quadprog (through qpsolvers, the ``reference`` extra) on the same problems.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlzoo.errors import NonFiniteGradientError
from mtlzoo.linalg import gramian_norms
from mtlzoo.solvers import min_norm_simplex, project_to_dual_cone, unit_trace


def jacobians(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Random (K, n) matrices of every kind the strategies meet, K from 1 to 10, float64."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for size in range(1, 11):
        generic = torch.randn(size, 30, generator=generator, dtype=torch.float64)
        conflicting = generic.clone()
        conflicting[1:] -= 2 * torch.rand(size - 1, 1, generator=generator, dtype=torch.float64) * generic[0]
        low_rank = torch.randn(size, 2, generator=generator, dtype=torch.float64) @ torch.randn(
            2, 30, generator=generator, dtype=torch.float64)
        zero_row = generic.clone()
        zero_row[size // 2] = 0
        duplicated = generic.clone()
        duplicated[-1] = duplicated[0]
        cases += [(f"generic{size}", generic), (f"conflicting{size}", conflicting), (f"low_rank{size}", low_rank),
                  (f"zero_row{size}", zero_row), (f"duplicated{size}", duplicated), (f"aligned{size}", generic.abs()),
                  (f"huge{size}", 1e30 * generic), (f"tiny{size}", 1e-30 * generic)]
    return cases


CASES = jacobians()


# ---------------------------------------------------------------- min-norm point
def test_min_norm_worked_examples() -> None:
    """By hand: orthogonal unit rows meet halfway; a row inside the others' reach wins; opposite rows give 0."""
    cases = {
        "orthogonal": (torch.eye(2), [0.5, 0.5]),
        "nearest_is_a_vertex": (torch.tensor([[1.0, 0.0], [1.0, 1.0]]), [1.0, 0.0]),
        "opposite": (torch.tensor([[2.0, 0.0], [-1.0, 0.0]]), [1 / 3, 2 / 3]),
        "one_task": (torch.tensor([[3.0, 4.0]]), [1.0]),
    }
    for name, (matrix, expected) in cases.items():
        weights = min_norm_simplex(matrix @ matrix.T)
        torch.testing.assert_close(weights, torch.tensor(expected), msg=name)


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=[name for name, _ in CASES])
def test_min_norm_point_is_optimal(name: str, matrix: torch.Tensor) -> None:
    """KKT: w on the simplex and x = J^T w satisfies x . g_j >= ||x||^2 for every row (nearest point of the hull)."""
    weights = min_norm_simplex(matrix @ matrix.T)
    assert weights.dtype == torch.float64 and bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    point = weights @ matrix
    scale = (matrix**2).sum()
    assert float((matrix @ point).min() - point @ point) >= -1e-10 * float(scale)


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=[name for name, _ in CASES])
def test_dual_cone_projection_is_optimal(name: str, matrix: torch.Tensor) -> None:
    """KKT of min_{v >= u} v^T G v for every u = e_k / K: v >= u, G v >= 0 (no conflict), G v = 0 where v > u."""
    size = matrix.shape[0]
    gramian = matrix @ matrix.T
    targets = torch.eye(size, dtype=torch.float64) / size
    solutions = project_to_dual_cone(targets, gramian)
    scale = float(torch.trace(gramian))
    assert solutions.shape == targets.shape
    for target, solution in zip(targets, solutions):
        products = gramian @ solution
        assert bool((solution >= target - 1e-12).all())
        assert float(products.min()) >= -1e-9 * scale
        free = products[solution > target + 1e-9]
        assert free.numel() == 0 or float(free.abs().max()) <= 1e-8 * scale


def test_dual_cone_worked_example() -> None:
    """By hand: g1 = (1, 0) conflicts with g2 = (-1, 1); the cone is d1 >= 0, d2 >= d1, so g1 projects to
    (1/2, 1/2) = 1 g1 + 1/2 g2 and g2 to (0, 1) = g1 + g2; the mean (0, 1/2) is in the cone and stays."""
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    solutions = project_to_dual_cone(torch.eye(2), matrix @ matrix.T)
    torch.testing.assert_close(solutions, torch.tensor([[1.0, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(solutions @ matrix, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    torch.testing.assert_close(project_to_dual_cone(torch.ones(2) / 2, matrix @ matrix.T), torch.ones(2) / 2)


def test_solvers_refuse_non_finite_gramians_and_bad_shapes() -> None:
    gramian = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        min_norm_simplex(gramian)
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        project_to_dual_cone(torch.ones(2), gramian)
    with pytest.raises(ValueError, match="square"):
        min_norm_simplex(torch.ones(2, 3))
    with pytest.raises(ValueError, match="weights"):
        project_to_dual_cone(torch.ones(3), torch.eye(2))


def test_solvers_keep_dtype_and_device() -> None:
    gramian = torch.tensor([[2.0, -1.0], [-1.0, 3.0]], dtype=torch.float32)
    assert min_norm_simplex(gramian).dtype == torch.float32
    assert project_to_dual_cone(torch.ones(2) / 2, gramian).dtype == torch.float32


@pytest.mark.reference
@pytest.mark.parametrize(("name", "matrix"), CASES, ids=[name for name, _ in CASES])
def test_solvers_agree_with_quadprog(name: str, matrix: torch.Tensor) -> None:
    """quadprog (an independent dual active-set QP solver) on the same problems, on the unit-trace Gramian
    with a 1e-12 ridge so that it accepts singular ones: the points J^T w agree to 1e-9 of ||J||."""
    qpsolvers = pytest.importorskip("qpsolvers")
    pytest.importorskip("quadprog")
    size = matrix.shape[0]
    gramian = (matrix @ matrix.T).numpy()
    unit = gramian / max(np.trace(gramian), 1e-300) + 1e-12 * np.eye(size)
    norm = float(torch.linalg.matrix_norm(matrix))
    reference = qpsolvers.solve_qp(unit, np.zeros(size), -np.eye(size), np.zeros(size), np.ones(size), np.ones(1),
                                   solver="quadprog")
    ours = min_norm_simplex(matrix @ matrix.T).numpy()
    assert np.linalg.norm((ours - reference) @ matrix.numpy()) <= 1e-9 * max(norm, 1e-300)
    for target in np.eye(size) / size:
        reference = qpsolvers.solve_qp(unit, np.zeros(size), -np.eye(size), -target, solver="quadprog")
        ours = project_to_dual_cone(torch.from_numpy(target), matrix @ matrix.T).numpy()
        assert np.linalg.norm((ours - reference) @ matrix.numpy()) <= 1e-9 * max(norm, 1e-300)


# ------------------------------------------------------------------- linalg
def test_unit_trace_and_gramian_norms_are_scale_free_and_safe_at_zero() -> None:
    matrix = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    gramian = (matrix @ matrix.T).double().numpy()
    np.testing.assert_allclose(unit_trace(gramian), gramian / 14)
    np.testing.assert_allclose(unit_trace(1e-30 * gramian), gramian / 14)
    np.testing.assert_allclose(unit_trace(gramian, 0.5), gramian / 14 + 0.5 * np.eye(2))
    assert not unit_trace(np.zeros((2, 2))).any()
    torch.testing.assert_close(gramian_norms(matrix @ matrix.T), torch.tensor([3.0, 5.0**0.5]))


def test_lstsq_and_eigh_are_numpys() -> None:
    """mtlzoo.solvers.lstsq / eigh call LAPACK's gelsd / syevd directly: the same answers as numpy.linalg.lstsq
    (rcond=None and a given cut-off) and numpy.linalg.eigh, singular systems included."""
    from mtlzoo.solvers import eigh, lstsq
    rng = np.random.default_rng(0)
    for size in (1, 2, 5, 41):
        for rank in {size, max(size // 2, 1)}:
            factor = rng.standard_normal((size, rank))
            matrix = factor @ factor.T
            rhs = rng.standard_normal(size)
            np.testing.assert_allclose(lstsq(matrix, rhs), np.linalg.lstsq(matrix, rhs, rcond=None)[0], rtol=1e-9,
                                       atol=1e-9 * np.abs(np.linalg.pinv(matrix) @ rhs).max())
            np.testing.assert_allclose(lstsq(matrix, rhs, cutoff=1e-3), np.linalg.lstsq(matrix, rhs, rcond=1e-3)[0],
                                       rtol=1e-9, atol=1e-12)
            values, vectors = eigh(matrix)
            np.testing.assert_allclose(values, np.linalg.eigh(matrix)[0], atol=1e-12 * np.abs(values).max())
            np.testing.assert_allclose((vectors * values) @ vectors.T, matrix, atol=1e-12 * np.abs(values).max())
