"""The host (numpy / Python-float) paths of the Gramian aggregators against the previous, tensor-by-tensor
implementations, kept here verbatim as references (mtlzoo before the per-step speed work of issue 12), and
GradDrop's few-pass update against its mask formula written out (the paper's Algorithm 1, lines 10-15).

Every case runs on random Gramians of K = 1, 2, 3, 10, 40 tasks: generic, rank-deficient (rank 2),
with a zero row and with duplicated rows, in float32 (as a step gives them) and float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.strategies import gradvac as gradvac_module
from mtlzoo.strategies import pcgrad as pcgrad_module
from mtlzoo.strategies.aligned_mtl import balance_transformation
from mtlzoo.strategies.imtl_g import equal_projection_weights

SIZES = (1, 2, 3, 10, 40)


def matrices(size: int, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    generic = torch.randn(size, 60, generator=generator, dtype=torch.float64)
    generic += 0.3 * torch.randn(1, 60, generator=generator, dtype=torch.float64)
    low_rank = torch.randn(size, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 60, generator=generator, dtype=torch.float64)
    zero_row = generic.clone()
    zero_row[size // 2] = 0
    duplicated = generic.clone()
    duplicated[-1] = duplicated[0]
    return [("generic", generic), ("low_rank", low_rank), ("zero_row", zero_row), ("duplicated", duplicated)]


CASES = [(f"{name}{size}-{dtype}", matrix.to(dtype)) for size in SIZES for name, matrix in matrices(size)
         for dtype in (torch.float32, torch.float64)]
IDS = [name for name, _ in CASES]


# ------------------------------------------------- the previous implementations (references)
def pcgrad_reference(gramian: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    matrix = gramian.detach().to("cpu", torch.float64)
    size = matrix.shape[0]
    weights = torch.zeros(size, dtype=torch.float64)
    for i in range(size):
        combination = torch.zeros(size, dtype=torch.float64)
        combination[i] = 1.0
        for j in torch.randperm(size, generator=generator).tolist():
            if j == i or matrix[j, j] <= 0:
                continue
            product = combination @ matrix[:, j]
            if product < 0:
                combination[j] -= product / matrix[j, j]
        weights += combination
    return weights


def gradvac_reference(gramian: torch.Tensor, targets: torch.Tensor, beta: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    limit = gradvac_module.TARGET_LIMIT
    matrix = gramian.detach().to("cpu", torch.float64)
    updated = targets.clone()
    size = matrix.shape[0]
    norms = matrix.diagonal().clamp_min(0).sqrt()
    coefficients = torch.eye(size, dtype=torch.float64)
    for i in range(size):
        products = coefficients[i] @ matrix
        for j in torch.randperm(size, generator=generator).tolist():
            if j == i:
                continue
            norm_i = float((coefficients[i] @ products).clamp_min(0).sqrt())
            if norm_i == 0 or norms[j] == 0:
                continue
            cosine = max(-1.0, min(1.0, float(products[j]) / (norm_i * float(norms[j]))))
            target = float(targets[i, j])
            if cosine < target:
                capped = max(-limit, min(limit, target))
                root = math.sqrt(1 - capped**2)
                step = norm_i * (capped * math.sqrt(1 - cosine**2) - cosine * root) / (float(norms[j]) * root)
                coefficients[i, j] += step
                products = products + step * matrix[j]
            updated[i, j] = (1 - beta) * target + beta * cosine
    return coefficients.sum(0), updated


def imtl_g_reference(gramian: torch.Tensor) -> torch.Tensor:
    unit = gramian.to(torch.float64)
    trace = unit.diagonal().sum()
    unit = unit / trace if trace > 0 else torch.zeros_like(unit)
    norms = unit.diagonal().clamp_min(0).sqrt()
    weights = torch.zeros_like(norms)
    present = norms > 0
    count = int(present.sum())
    if count == 0:
        return weights
    system = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    system[:count, :count] = unit[present][:, present]
    system[:count, count] = -norms[present]
    system[count, :count] = 1.0
    rhs = torch.zeros(count + 1, dtype=torch.float64)
    rhs[count] = 1.0
    solution = torch.linalg.pinv(system, rtol=10 * (count + 1) * torch.finfo(gramian.dtype).eps) @ rhs
    weights[present] = solution[:count]
    return weights


def balance_reference(gramian: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gramian.to(torch.float64))
    kept = values > values.max() * gramian.shape[0] * torch.finfo(torch.float32).eps
    if not bool(kept.any()):
        return torch.zeros_like(gramian, dtype=torch.float64)
    values, vectors = values[kept], vectors[:, kept]
    return (vectors * (values.min() / values).sqrt()) @ vectors.T


def close_updates(ours: torch.Tensor, reference: torch.Tensor, matrix: torch.Tensor, rtol: float) -> None:
    """The updates J^T w agree to ``rtol`` of ||J||_F times the weights' size (weights may differ where rows are
    dependent; the update may not)."""
    wide = matrix.to(torch.float64)
    scale = float(torch.linalg.matrix_norm(wide)) * max(float(reference.abs().max()), 1.0)
    difference = ours.to(torch.float64) @ wide - reference.to(torch.float64) @ wide
    assert float(difference.norm()) <= rtol * max(scale, 1e-30)


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("small", [True, False], ids=["python", "numpy"])
@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
def test_pcgrad_host_path_matches_the_previous_loop(name: str, matrix: torch.Tensor, small: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Both host paths (Python floats up to SMALL tasks, numpy above) give the previous torch loop's weights, with
    the same task orders drawn from the same generator."""
    monkeypatch.setattr(pcgrad_module, "SMALL", 10**6 if small else 0)
    gramian = matrix @ matrix.T
    strategy = mtlzoo.create("pcgrad", num_tasks=matrix.shape[0], seed=3)
    ours = strategy.gramian_weights(gramian, torch.ones(matrix.shape[0], dtype=matrix.dtype))
    reference = pcgrad_reference(gramian, torch.Generator().manual_seed(3))
    assert ours.dtype == matrix.dtype
    close_updates(ours, reference, matrix, 1e-5 if matrix.dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("small", [True, False], ids=["python", "numpy"])
@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
def test_gradvac_host_path_matches_the_previous_loop(name: str, matrix: torch.Tensor, small: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights and staged targets of both host paths against the previous torch loop, from non-zero targets."""
    monkeypatch.setattr(gradvac_module, "SMALL", 10**6 if small else 0)
    size = matrix.shape[0]
    gramian = matrix @ matrix.T
    strategy = mtlzoo.create("gradvac", num_tasks=size, seed=5, beta=0.3)
    start = torch.rand(size, size, generator=torch.Generator().manual_seed(1)) - 0.4
    strategy.targets = start.clone()
    ours = strategy.gramian_weights(gramian, torch.ones(size, dtype=matrix.dtype))
    staged = strategy._staged["targets"]
    weights, updated = gradvac_reference(gramian, start.double(), 0.3, torch.Generator().manual_seed(5))
    close_updates(ours, weights, matrix, 1e-5 if matrix.dtype == torch.float32 else 1e-10)
    if name.startswith("low_rank") and size >= 10:
        # Rank 2: a corrected g_i lies in a plane and can nearly cancel, so its cosine with a later g_j is
        # ill-conditioned there (rounding in ||g_i^PC|| is amplified); the bulk still agrees to 1e-5.
        error = (staged - updated.float()).abs()
        assert float((error <= 1e-5).float().mean()) >= 0.99 and float(error.max()) <= 1e-2
    else:
        torch.testing.assert_close(staged, updated.float(), rtol=1e-5, atol=1e-5)
    strategy.advance()
    assert torch.equal(strategy.targets, staged)


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
def test_imtl_g_and_aligned_mtl_host_paths_match_the_previous_tensor_code(name: str, matrix: torch.Tensor) -> None:
    """IMTL-G's one gelsd solve against torch.linalg.pinv with the same cut-off; Aligned-MTL's LAPACK eigh against
    torch.linalg.eigh."""
    gramian = matrix @ matrix.T
    ours = equal_projection_weights(gramian)
    assert ours.dtype == matrix.dtype
    close_updates(ours, imtl_g_reference(gramian), matrix, 1e-4 if matrix.dtype == torch.float32 else 1e-9)
    balance = balance_transformation(gramian)
    reference = balance_reference(gramian)
    wide = matrix.to(torch.float64)
    scale = max(float(torch.linalg.matrix_norm(wide)) * float(reference.abs().max()), 1e-30)
    tolerance = 1e-4 if matrix.dtype == torch.float32 else 1e-8
    assert float((balance.double() @ wide - reference @ wide).norm()) <= tolerance * scale


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
def test_step_and_standalone_faces_agree(name: str, matrix: torch.Tensor) -> None:
    """compute() (one host transfer, the weights back as one tensor) and gramian_weights give the same weights,
    of the Gramian's dtype, for every Gramian aggregator on the host path."""
    from mtlzoo.protocol import StepInputs
    size = matrix.shape[0]
    gramian = matrix @ matrix.T
    for method in ("mgda", "upgrad", "dualproj", "imtl_g", "aligned_mtl", "cagrad", "pcgrad", "gradvac"):
        step = mtlzoo.create(method, num_tasks=size, **({"seed": 1} if method in ("pcgrad", "gradvac") else {}))
        alone = mtlzoo.create(method, num_tasks=size, **({"seed": 1} if method in ("pcgrad", "gradvac") else {}))
        inputs = StepInputs(torch.ones(size), torch.arange(size), size, micro_batch=0)
        inputs.gramian = gramian
        weights = step.compute(inputs).weights
        assert weights is not None and weights.dtype == gramian.dtype, method
        torch.testing.assert_close(weights, alone.gramian_weights(gramian, torch.ones(size, dtype=matrix.dtype)),
                                   msg=method)


def test_a_non_finite_gramian_gives_a_non_finite_step_and_an_error_standalone() -> None:
    from mtlzoo.errors import NonFiniteGradientError
    from mtlzoo.protocol import StepInputs
    gramian = torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]])
    for method in ("mgda", "upgrad", "pcgrad", "cagrad", "nash_mtl"):
        inputs = StepInputs(torch.ones(2), torch.arange(2), 2, micro_batch=0)
        inputs.gramian = gramian
        weights = mtlzoo.create(method, num_tasks=2).compute(inputs).weights
        assert weights is not None and bool(torch.isnan(weights).all()), method
        with pytest.raises(NonFiniteGradientError):
            mtlzoo.create(method, num_tasks=2).gramian_weights(gramian, torch.ones(2))


@pytest.mark.parametrize("leak", [0.0, [0.0, 0.5, 1.0, 0.25]])
def test_graddrop_few_pass_update_is_the_mask_formula(leak: float | list[float]) -> None:
    """The paper's masks written out (P = (1 + sum g / sum |g|) / 2, M_k = 1[P > U] 1[g_k > 0] + 1[P < U] 1[g_k < 0],
    d = sum_k (l_k + (1 - l_k) M_k) g_k) with the same U: equal to rounding, away from the elements where P is
    within rounding of U (there the two roundings of P may pick different signs)."""
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 64, 33, generator=generator)
    grads[:, 0, :5] = 0  # elements where every task's gradient is 0
    grads[1:, 1] = grads[0, 1].abs()  # all positive
    strategy = mtlzoo.create("graddrop", num_tasks=4, target="parameters", leak=leak, seed=7)
    ours = strategy.aggregate(grads, torch.ones(4))
    draw = torch.rand(grads.shape[1:], generator=torch.Generator().manual_seed(7))
    total, magnitude = grads.sum(0), grads.abs().sum(0)
    purity = torch.where(magnitude > 0, 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1)), 0.5)
    masks = ((purity > draw) & (grads > 0)) | ((purity < draw) & (grads < 0))
    leaks = torch.as_tensor(leak, dtype=grads.dtype).expand(4).view(-1, 1, 1)
    reference = ((leaks + (1 - leaks) * masks) * grads).sum(0)
    clear = (purity - draw).abs() > 1e-5
    assert int(clear.sum()) > 0.99 * clear.numel()
    torch.testing.assert_close(ours[clear], reference[clear])
    assert torch.equal(ours[0, :5], torch.zeros(5))


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


def test_linalg_all_finite_is_exact_where_its_sum_is_not() -> None:
    """The sum-based check: finite entries whose sum overflows are finite; inf, -inf and NaN are not."""
    from mtlzoo.linalg import all_finite
    huge = torch.full((4,), 3e38)
    assert all_finite(huge) and all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), 1.0]))


@pytest.mark.parametrize(("name", "matrix"), [case for case in CASES if case[1].dtype == torch.float64],
                         ids=[name for name, matrix in CASES if matrix.dtype == torch.float64])
def test_nash_mtl_skips_the_hull_test_only_where_it_would_pass(name: str, matrix: torch.Tensor) -> None:
    """The previous criterion, applied here independently: the update is 0 with a warning exactly where the
    min-norm point of the (non-zero) rows' hull has squared norm <= STATIONARY tr(G) on the unit-Frobenius Gramian
    (mtlzoo.solvers.min_norm_simplex); elsewhere alpha_k (G alpha)_k = 1 (the paper's characterisation)."""
    import warnings

    from mtlzoo.errors import SolverWarning
    from mtlzoo.solvers import min_norm_simplex
    from mtlzoo.strategies.nash_mtl import STATIONARY
    size = matrix.shape[0]
    gramian = matrix @ matrix.T
    rows = matrix[gramian.diagonal() > 0]
    stationary = False
    if rows.shape[0]:  # no non-zero row: nothing bargains (a warning of its own)
        unit = rows @ rows.T / torch.linalg.matrix_norm(gramian)
        hull = min_norm_simplex(unit)
        stationary = float(hull @ unit @ hull) <= STATIONARY * float(unit.trace())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = mtlzoo.create("nash_mtl", num_tasks=size, max_norm=0.0).gramian_weights(
            gramian, torch.ones(size, dtype=torch.float64))
    said = " ".join(str(warning.message) for warning in caught if issubclass(warning.category, SolverWarning))
    assert ("Pareto-stationary" in said) == stationary
    if stationary:
        assert torch.equal(weights, torch.zeros(size, dtype=torch.float64))
    elif "did not converge" not in said:
        present = gramian.diagonal() > 0
        torch.testing.assert_close((weights * (gramian @ weights))[present],
                                   torch.ones(int(present.sum()), dtype=torch.float64))


@pytest.mark.parametrize(("name", "matrix"), [case for case in CASES if case[1].dtype == torch.float64],
                         ids=[name for name, matrix in CASES if matrix.dtype == torch.float64])
def test_cagrad_interior_newton_agrees_with_slsqp(name: str, matrix: torch.Tensor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """CAGrad's Newton steps from the simplex's centre, where they are accepted, give SLSQP's polished answer (the
    previous and only path when the interior test is switched off): the same update to 1e-6 of ||J||."""
    from mtlzoo.strategies import cagrad as cagrad_module
    size = matrix.shape[0]
    ones = torch.ones(size, dtype=torch.float64)
    for c in (0.4, 0.9):
        with monkeypatch.context() as patch:  # the closed form off: the Newton steps where they are accepted
            patch.setattr(cagrad_module, "definite_conflict_averse", lambda *args: None)
            fast = mtlzoo.create("cagrad", num_tasks=size, c=c).aggregate(matrix, ones)
            patch.setattr(cagrad_module, "_interior_optimum", lambda *args: None)
            reference = mtlzoo.create("cagrad", num_tasks=size, c=c).aggregate(matrix, ones)
        scale = float(torch.linalg.matrix_norm(matrix))
        assert float((fast - reference).norm()) <= 1e-6 * max(scale, 1e-300), c


def test_cagrad_takes_the_interior_path_on_some_cases() -> None:
    """The interior test is not vacuous: it accepts a generic case (and then SLSQP is not called) and refuses one
    whose optimum has a zero weight (a task far inside the others' hull of improvement)."""
    from mtlzoo.strategies import cagrad as cagrad_module
    orthogonal = np.eye(3) / 3
    assert cagrad_module._interior_optimum(orthogonal, orthogonal.mean(axis=1), 0.4 * math.sqrt(orthogonal.mean())) \
        is not None
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    gramian = rows @ rows.T / np.trace(rows @ rows.T)
    weights = cagrad_module.conflict_averse_weights(gramian, 0.4)
    assert weights.min() < 1e-9
    assert cagrad_module._interior_optimum(gramian, gramian.mean(axis=1), 0.4 * math.sqrt(gramian.mean())) is None


# ------------------------------------------ small positive-definite Gramians on Python floats (issue 12)
def representation_like(size: int, seed: int) -> torch.Tensor:
    """Rows like the representation gradients of the speed benchmark: nearly orthogonal, with small conflicts."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 128, generator=generator, dtype=torch.float64) * torch.rand(
        size, 1, generator=generator, dtype=torch.float64).add(0.5)


def balanced(size: int, seed: int) -> torch.Tensor:
    """Rows of about equal norms, each pair in a small conflict (the mean taken off): CAGrad's optimum is interior."""
    rows = torch.randn(size, 512, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return rows - 0.2 * rows.mean(0)


def conflicting(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(size, 30, generator=generator, dtype=torch.float64)
    rows[1:] -= 2 * torch.rand(size - 1, 1, generator=generator, dtype=torch.float64) * rows[0]
    return rows


DEFINITE_SIZES = (1, 2, 3, 4, 8)
DEFINITE_CASES = [(f"{name}{size}-{dtype}", matrix.to(dtype)) for size in (*DEFINITE_SIZES, 10)
                  for name, matrix in [*matrices(size, seed=size),
                                       ("representation", representation_like(size, size)),
                                       ("balanced", balanced(size, size)),
                                       ("conflicting", conflicting(size, size)),
                                       ("scaled", conflicting(size, 2 * size) * torch.logspace(
                                           -3, 3, size, dtype=torch.float64)[:, None]),
                                       ("huge", 1e15 * conflicting(size, 3 * size)),
                                       ("tiny", 1e-15 * conflicting(size, 3 * size))]
                  for dtype in (torch.float32, torch.float64)]
DEFINITE_IDS = [name for name, _ in DEFINITE_CASES]
FAST_METHODS = (("upgrad", {}), ("upgrad", {"reg_eps": 1e-4}), ("upgrad", {"pref_vector": "ramp"}),
                ("dualproj", {}), ("mgda", {}), ("mgda", {"normalization": "l2"}), ("cagrad", {}),
                ("cagrad", {"c": 0.9, "rescale": 0}), ("nash_mtl", {}))


def fast_options(size: int, options: dict) -> dict:
    if options.get("pref_vector") == "ramp":
        return {**options, "pref_vector": [1.0 + k for k in range(size)]}
    return options


@pytest.mark.parametrize(("name", "matrix"), DEFINITE_CASES, ids=DEFINITE_IDS)
def test_small_definite_paths_match_the_numpy_paths(name: str, matrix: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: the previous numpy / LAPACK path of each method (gelsd least squares, Wolfe's algorithm, Newton
    steps or SLSQP for CAGrad), which ``SMALL = 0`` restores everywhere. Each method's step weights (float32
    Gramians, as a step gives them) and standalone update agree with it to rounding, on degenerate Gramians too
    (there :func:`mtlzoo.solvers.definite_unit` must refuse, and a Cholesky path that did not would fail here);
    and the Python-float path is taken on every safely definite Gramian of at most SMALL tasks."""
    import warnings

    from mtlzoo import solvers
    from mtlzoo.protocol import StepInputs
    size = matrix.shape[0]
    gramian = matrix @ matrix.T
    certified = solvers.definite_unit(solvers.to_host(gramian), torch.finfo(matrix.dtype).eps) is not None
    singular = (name.startswith("zero_row") or (name.startswith("duplicated") and size > 1)
                or (name.startswith("low_rank") and size > 2))
    if name.startswith("scaled"):  # definite, its certificate depends on the dtype's rounding unit
        assert not certified or size <= solvers.SMALL
    else:
        assert certified == (size <= solvers.SMALL and not singular)
    tolerance = 1e-5 if matrix.dtype == torch.float32 else 1e-9
    losses = torch.rand(size, generator=torch.Generator().manual_seed(size), dtype=matrix.dtype) + 0.5
    for method, options in FAST_METHODS:
        options = fast_options(size, options)
        answers = []
        for small in (solvers.SMALL, 0):
            monkeypatch.setattr(solvers, "SMALL", small)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Nash-MTL's warnings on degenerate Gramians, alike on both paths
                inputs = StepInputs(losses, torch.arange(size), size, micro_batch=0)
                inputs.gramian = gramian
                step = mtlzoo.create(method, num_tasks=size, **options).compute(inputs).weights
                update = mtlzoo.create(method, num_tasks=size, **options).aggregate(matrix, losses)
            answers.append((step, update))
        (step, update), (step_reference, update_reference) = answers
        assert step is not None and step_reference is not None and step.dtype == gramian.dtype
        close_updates(step.double(), step_reference.double(), matrix, tolerance)
        scale = float(torch.linalg.matrix_norm(matrix.double())) * max(float(step_reference.abs().max()), 1.0)
        assert float((update.double() - update_reference.double()).norm()) <= tolerance * scale, (method, options)


def test_definite_unit_certifies_only_safely_positive_definite_gramians() -> None:
    """Gramians built from chosen eigenvalues: certified (and then equal to :func:`clean_gramian`'s matrix) just
    above max(DEFINITE, 64 K eps), refused just below it, and refused when singular, zero, subnormal, infinite
    or larger than SMALL tasks."""
    from mtlzoo.solvers import DEFINITE, SMALL, clean_gramian, definite_unit
    rng = np.random.default_rng(0)
    for size in (2, 4, SMALL):
        vectors = np.linalg.qr(rng.standard_normal((size, size)))[0]
        for eps in (0.0, float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)):
            bound = max(DEFINITE, 64 * size * eps)
            for factor, accepted in ((1.5, True), (0.5, False), (0.0, False), (-1.0, False)):
                values = np.linspace(1.0, 2.0, size)
                values[0] = 0.0
                values *= (1 - factor * bound) / values.sum()
                values[0] = factor * bound  # unit trace, smallest eigenvalue factor * bound
                gramian = (vectors * values) @ vectors.T * 3.7
                unit = definite_unit(gramian, eps)
                assert (unit is not None) == accepted, (size, eps, factor)
                if unit is not None:
                    np.testing.assert_allclose(np.array(unit), clean_gramian(gramian, eps), rtol=0, atol=1e-13)
    identity = np.eye(3)
    assert definite_unit(identity) is not None
    assert definite_unit(np.zeros((3, 3))) is None
    assert definite_unit(identity * 1e-300) is None  # a subnormal trace
    assert definite_unit(identity * 1e300) is not None and definite_unit(np.full((2, 2), 1e308) + np.eye(2)) is None
    assert definite_unit(np.eye(SMALL + 1)) is None and definite_unit(np.zeros((0, 0))) is None
    ridged = definite_unit(np.diag([1.0, 0.0]), ridge=0.1)  # UPGrad's reg_eps makes a singular Gramian definite
    assert ridged is not None
    np.testing.assert_allclose(np.array(ridged), np.diag([1.1, 0.1]) / 1.2, rtol=1e-15)


@pytest.mark.parametrize("size", DEFINITE_SIZES)
def test_small_definite_min_norm_is_the_best_support(size: int) -> None:
    """Independent reference for MGDA's Python-float path: every support S of the weights, the affine minimiser
    ``G_S^{-1} 1 / 1^T G_S^{-1} 1`` by numpy.linalg.solve, the feasible one of least norm (the problem is
    strictly convex on a definite Gramian). Conflicting and representation-like rows; the path is taken."""
    import itertools

    from mtlzoo.solvers import definite_min_norm, definite_unit
    for rows in (conflicting(size, 7), representation_like(size, 8), conflicting(size, 9).abs()):
        gramian = (rows @ rows.T).numpy()
        unit = definite_unit(gramian)
        assert unit is not None
        ours = np.array(definite_min_norm(unit))
        best, best_value = None, np.inf
        for count in range(1, size + 1):
            for support in itertools.combinations(range(size), count):
                index = list(support)
                solution = np.linalg.solve(gramian[np.ix_(index, index)], np.ones(count))
                if solution.min() <= 0:
                    continue
                weights = np.zeros(size)
                weights[index] = solution / solution.sum()
                value = weights @ gramian @ weights
                if value < best_value:
                    best, best_value = weights, value
        np.testing.assert_allclose(ours, best, rtol=0, atol=1e-10)


@pytest.mark.reference
@pytest.mark.parametrize("size", (2, 3, 4, 8))
def test_small_definite_dual_cone_equals_torchjd(size: int) -> None:
    """torchjd 0.18's UPGradWeighting and DualProjWeighting (quadprog on G / tr(G) + 1e-4 I) against mtlzoo's
    Python-float path with reg_eps=1e-4 (taken here: the Gramians are definite), to 1e-10 of the weights."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from mtlzoo.solvers import definite_unit
    for rows in (conflicting(size, 11), representation_like(size, 12), conflicting(size, 13) * 10.0):
        gramian = rows @ rows.T
        assert definite_unit(gramian.numpy(), ridge=1e-4) is not None
        for method, reference in (("upgrad", aggregation.UPGradWeighting()),
                                  ("dualproj", aggregation.DualProjWeighting())):
            ours = mtlzoo.create(method, num_tasks=size, reg_eps=1e-4).gramian_weights(gramian, torch.ones(size))
            expected = reference(gramian)
            scale = float(expected.abs().max())
            torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=0, atol=1e-10 * scale, msg=method)


@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 2.0])
@pytest.mark.parametrize("size", (2, 3, 4, 8))
def test_cagrad_definite_active_set_is_the_minimiser(size: int, c: float) -> None:
    """CAGrad's exact active set (:func:`definite_conflict_averse`) against its problem: the minimiser it implies
    (w, recovered from the weights of d = 1/K + (r / n) w) is on the simplex and satisfies the optimality conditions
    (the function is convex: equal partial derivatives on the support, none below them off it), and SLSQP from
    the centre, polished (the previous path), finds the same point; on interior optima (balanced rows) and on
    optima with zero weights (a task far inside the others' reach), from the centre and from the best vertex."""
    from mtlzoo.solvers import definite_unit
    from mtlzoo.strategies import cagrad as cagrad_module
    from mtlzoo.strategies.cagrad import SMOOTHING, definite_conflict_averse
    boundary = 0
    for rows in (balanced(size, 20), conflicting(size, 21), representation_like(size, 22), conflicting(size, 23).abs(),
                 torch.cat([balanced(size - 1, 24), 3.0 * balanced(size - 1, 24).mean(0, keepdim=True)])):
        gramian = (rows @ rows.T).numpy()
        unit = definite_unit(gramian)
        if unit is None:
            continue
        unit_array = np.array(unit)
        weights = definite_conflict_averse(unit, c)
        assert weights is not None
        mean = unit_array.mean(axis=1)
        radius = c * math.sqrt(unit_array.mean())
        excess = np.array(weights) - 1.0 / size
        w = excess / excess.sum()
        assert w.min() >= 0
        norm = math.sqrt(w @ unit_array @ w + SMOOTHING)
        np.testing.assert_allclose(excess, radius / norm * w, rtol=1e-9, atol=1e-15)
        gradient = mean + radius * (unit_array @ w) / norm
        support = w > 0
        boundary += int(not support.all())
        level = float(gradient[support].min())
        scale = float(np.abs(gradient).max())
        assert float(gradient[support].max()) - level <= 1e-9 * scale
        assert float(gradient[~support].min(initial=np.inf)) >= level - 1e-9 * scale
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cagrad_module, "_interior_optimum", lambda *args: None)
            np.testing.assert_allclose(cagrad_module.conflict_averse_weights(unit_array, c), w, rtol=0, atol=1e-7)
    assert boundary >= 1  # the zero-weight faces are exercised


def test_cagrad_active_set_answers_the_boundary_example() -> None:
    """Hand-made: a third row (5, 5) beside (1, 0) and (0, 1) is far inside their improvement: its weight is 0, as
    SLSQP finds (the previous path), on a safely definite Gramian."""
    from mtlzoo.solvers import definite_unit
    from mtlzoo.strategies import cagrad as cagrad_module
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 0.1]])
    unit = definite_unit(rows @ rows.T)
    assert unit is not None
    weights = np.array(cagrad_module.definite_conflict_averse(unit, 0.4))
    excess = weights - 1 / 3
    assert excess[2] == 0 and excess[:2].min() > 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cagrad_module, "_interior_optimum", lambda *args: None)
        reference = cagrad_module.conflict_averse_weights(np.array(unit), 0.4)
    np.testing.assert_allclose(excess / excess.sum(), reference, atol=1e-7)
