"""Nash-MTL's Python-float path (up to mtlzoo.solvers.SMALL tasks, issue 12) against its numpy / LAPACK path.

Reference: the previous implementation, which ``solvers.SMALL = 0`` restores for Nash-MTL (the numpy
``bargaining_weights`` with LAPACK's Cholesky solve, ``host_weights`` and ``_solve`` as before). Both faces (a
step's ``compute`` and standalone ``gramian_weights`` / ``aggregate``), the staged state, the warnings and a run
of warm-started steps must agree to rounding, on generic and degenerate Gramians (rank-deficient, a zero row,
duplicated rows, K = 1, Pareto-stationary, huge and tiny scales, scales that overflow or underflow), in float32 (as
a step gives them) and float64. The torchjd 0.18 comparison (tests/strategies/test_surgery_reference.py, marker
``reference``) runs on K = 2, 3, 5, 7, that is on this path.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo import solvers
from mtlzoo.errors import SolverWarning
from mtlzoo.protocol import StepInputs
from mtlzoo.strategies import nash_mtl as nash_module


def jacobians(size: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    generic = draw(size, 40) + 0.3 * draw(1, 40)
    representation = draw(size, 128) * (torch.rand(size, 1, generator=generator, dtype=torch.float64) + 0.5)
    conflicting = draw(size, 30)
    conflicting[1:] -= 1.2 * torch.rand(size - 1, 1, generator=generator, dtype=torch.float64) * conflicting[0]
    low_rank = draw(size, 2) @ draw(2, 40)
    zero_row = generic.clone()
    zero_row[size // 2] = 0
    duplicated = generic.clone()
    duplicated[-1] = duplicated[0]
    stationary = generic.clone()
    stationary[-1] = -generic[:-1].sum(0) if size > 1 else 0  # 0 in the hull
    near_stationary = generic.clone()
    if size > 1:
        near_stationary[-1] = -generic[:-1].sum(0) + 1e-4 * draw(40)
    scaled = conflicting * torch.logspace(-3, 3, size, dtype=torch.float64)[:, None]
    return [("generic", generic), ("representation", representation), ("conflicting", conflicting),
            ("low_rank", low_rank), ("zero_row", zero_row), ("duplicated", duplicated), ("stationary", stationary),
            ("near_stationary", near_stationary), ("scaled", scaled), ("huge", 1e15 * conflicting),
            ("tiny", 1e-15 * conflicting), ("overflowing", 1e160 * generic), ("underflowing", 1e-165 * generic)]


SIZES = (1, 2, 3, 4, 8)
CASES = [(f"{name}{size}", matrix) for size in SIZES for name, matrix in jacobians(size, size)]
IDS = [name for name, _ in CASES]
OPTIONS = ({"max_norm": 0.0}, {}, {"max_iterations": 3})


def run_both(make: object, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """``make()`` on the Python-float path, then on the numpy path (solvers.SMALL = 0): answers and warnings."""
    answers = []
    for small in (solvers.SMALL, 0):
        with monkeypatch.context() as patch:
            patch.setattr(solvers, "SMALL", small)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                answer = make()
        said = [str(warning.message) for warning in caught if issubclass(warning.category, SolverWarning)]
        assert len(said) == len(caught), [str(warning.message) for warning in caught]
        answers.append((answer, said))
    return answers[0], answers[1]


def condition(gramian: torch.Tensor) -> float:
    """The condition number of the Hessian ``Ĝ + diag(1 / α̂^2)`` at the bargaining solution ``α̂`` of the
    unit-Frobenius Gramian of the non-zero rows (numpy's solver, run long; 1 where it finds none): rounding errors
    in the inputs reach the weights multiplied by it (near-stationary gradients: large ``α̂``, large condition
    numbers)."""
    matrix = gramian.double().numpy()
    present = np.diag(matrix) > 0
    size = float(np.linalg.norm(matrix))
    if not present.any() or not math.isfinite(size):
        return 1.0
    block = matrix[np.ix_(present, present)] / size
    with np.errstate(all="ignore"):
        alpha, converged = nash_module.bargaining_weights(block, np.ones(int(present.sum())), 5000)
    if not converged or not np.isfinite(alpha).all():
        return 1.0
    return float(np.linalg.cond(block + np.diag(1 / alpha**2)))


def assert_same(fast: torch.Tensor, reference: torch.Tensor, cond: float = 1.0) -> None:
    """Equal to 1e-10 of the largest weight in float64, to float32's rounding (one unit) in float32; on an
    ill-conditioned problem to ``1e-15 cond`` (two runs of the numpy path on Gramians one rounding apart differ
    by about ``1e-16 cond``)."""
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    assert torch.equal(torch.isfinite(fast), torch.isfinite(reference))
    rtol = max(1e-10 if fast.dtype == torch.float64 else 2.0 ** -23, 1e-15 * cond)
    fast, reference = fast.double(), reference.double()
    finite = torch.isfinite(reference)
    assert largest(fast[finite] - reference[finite]) <= rtol * largest(reference[finite]), (fast, reference)


def largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def step_inputs(gramian: torch.Tensor, micro_batch: int = 0, tasks: torch.Tensor | None = None) -> StepInputs:
    size = gramian.shape[0]
    tasks = torch.arange(size) if tasks is None else tasks
    inputs = StepInputs(torch.ones(size, dtype=gramian.dtype), tasks, int(tasks.max()) + 1 if size else 0,
                        micro_batch=micro_batch)
    inputs.gramian = gramian
    return inputs


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_weights_and_state_equal_the_numpy_path(name: str, matrix: torch.Tensor, dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """compute() on the Gramian as a step gives it (float32) and in float64, from a warm start (previous weights
    that are not ones), with and without clipping and with few Newton steps: the same weights, the same staged
    previous weights and the same warnings as the numpy path."""
    gramian = (matrix @ matrix.T).to(dtype)
    size = matrix.shape[0]
    previous = torch.linspace(0.5, 2.0, size) * (3.0 if name.startswith("huge") else 1.0)
    for options in OPTIONS:
        def make(options: dict = options) -> tuple[torch.Tensor, torch.Tensor]:
            strategy = mtlzoo.create("nash_mtl", num_tasks=size, target="representation", **options)
            strategy.previous_weights = previous.clone()
            weights = strategy.compute(step_inputs(gramian)).weights
            strategy.advance()
            return weights, strategy.previous_weights

        ((weights, staged), said), ((weights_reference, staged_reference), said_reference) = run_both(make, monkeypatch)
        assert said == said_reference, options
        assert weights.dtype == dtype and staged.dtype == torch.float32
        cond = condition(gramian)
        assert_same(weights, weights_reference, cond)
        assert_same(staged, staged_reference, cond)
        if cond < 1e5:
            assert_same(weights, weights_reference)


@pytest.mark.parametrize(("name", "matrix"), CASES, ids=IDS)
def test_standalone_aggregate_equals_the_numpy_path(name: str, matrix: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """gramian_weights and aggregate (the standalone face, float64 Gramian): the same weights and update, and the
    same warnings (text and count), as the numpy path."""
    size = matrix.shape[0]
    losses = torch.ones(size, dtype=torch.float64)
    if not bool(torch.isfinite(matrix @ matrix.T).all()):  # standalone, an error on both paths, the same one
        raised = []
        for small in (solvers.SMALL, 0):
            monkeypatch.setattr(solvers, "SMALL", small)
            with pytest.raises(Exception) as error:
                mtlzoo.create("nash_mtl", num_tasks=size).gramian_weights(matrix @ matrix.T, losses)
            raised.append((type(error.value), str(error.value)))
        assert raised[0] == raised[1]
        return
    for options in OPTIONS:
        def make(options: dict = options) -> tuple[torch.Tensor, torch.Tensor]:
            strategy = mtlzoo.create("nash_mtl", num_tasks=size, **options)
            weights = strategy.gramian_weights(matrix @ matrix.T, losses)
            return weights, mtlzoo.create("nash_mtl", num_tasks=size, **options).aggregate(matrix, losses)

        ((weights, update), said), ((weights_reference, update_reference), said_reference) = run_both(
            make, monkeypatch)
        assert said == said_reference, options
        cond = condition(matrix @ matrix.T)
        assert_same(weights, weights_reference, cond)
        scale = float(matrix.norm()) * max(largest(weights_reference), 1.0)
        assert float((update - update_reference).norm()) <= max(1e-10, 1e-15 * cond) * scale


def test_warm_started_steps_and_partial_steps_equal_the_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty steps of slowly moving float32 Gramians (each warm-started at the previous step's weights, as in
    training), with update_weights_every = 3, a second micro-batch (which must not stage) and steps where only
    some tasks are present: weights and the state after each step as on the numpy path."""
    generator = torch.Generator().manual_seed(7)
    rows = torch.randn(5, 64, generator=generator, dtype=torch.float64)
    moves = [0.05 * torch.randn(5, 64, generator=generator, dtype=torch.float64) for _ in range(40)]

    def make() -> list[torch.Tensor]:
        strategy = mtlzoo.create("nash_mtl", num_tasks=5, target="representation", update_weights_every=3)
        current = rows.clone()
        seen = []
        for number, move in enumerate(moves):
            current = current + move
            tasks = torch.tensor([0, 2, 3]) if number % 4 == 1 else torch.arange(5)
            gramian = (current[tasks] @ current[tasks].T).float()
            for micro_batch in (0, 1):
                seen.append(strategy.compute(step_inputs(gramian, micro_batch, tasks)).weights)
            strategy.advance()
            seen.append(strategy.previous_weights.clone())
        return seen

    (fast, said), (reference, said_reference) = run_both(make, monkeypatch)
    assert said == said_reference == []
    for ours, theirs in zip(fast, reference, strict=True):
        assert_same(ours, theirs)


def test_a_non_finite_gramian_gives_non_finite_weights() -> None:
    """The step face leaves a non-finite Gramian to the base class: nan weights (the engine then raises or lets
    the GradScaler skip), nothing staged."""
    strategy = mtlzoo.create("nash_mtl", num_tasks=3, target="representation")
    gramian = torch.eye(3, dtype=torch.float64)
    gramian[0, 1] = math.nan
    assert bool(torch.isnan(strategy.compute(step_inputs(gramian)).weights).all())
    assert strategy._staged == {}
    gramian[0, 1] = math.inf
    assert bool(torch.isnan(strategy.compute(step_inputs(gramian)).weights).all())


def test_the_python_float_newton_is_taken_and_gives_numpys_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """small_bargaining_weights against bargaining_weights (numpy, LAPACK) on the same start: the same converged
    answer to 1e-12, and with it the step never calls the numpy solver (so a fast path that silently fell back
    everywhere would fail here); where Newton's method needs more steps than allowed it answers None (K = 1: the
    start's rescaling is the solution)."""
    for size in (1, 2, 4, 8):
        for _, matrix in jacobians(size, 10 + size)[:3]:  # generic, representation-like, conflicting
            gramian = (matrix @ matrix.T).numpy()
            gramian /= np.linalg.norm(gramian)
            start = np.linspace(0.3, 3.0, size)
            expected, converged = nash_module.bargaining_weights(gramian, start)
            assert converged
            fast = nash_module.small_bargaining_weights(gramian.tolist(), start.tolist(), 200)
            assert fast is not None
            np.testing.assert_allclose(fast, expected, rtol=1e-12, atol=0)
            product = np.array(fast) * (gramian @ np.array(fast))
            np.testing.assert_allclose(product, np.ones(size), rtol=1e-9)
            with np.errstate(all="ignore"):
                _, converged = nash_module.bargaining_weights(gramian, 100 * start, 2)
            assert (nash_module.small_bargaining_weights(gramian.tolist(), (100 * start).tolist(), 2) is None) == (
                not converged)
            assert size == 1 or not converged  # far from the solution: more than two steps

    def refuse(*args: object) -> object:
        raise AssertionError("the numpy solver was called")

    monkeypatch.setattr(nash_module, "bargaining_weights", refuse)
    matrix = jacobians(4, 3)[1][1]
    strategy = mtlzoo.create("nash_mtl", num_tasks=4, target="representation", max_norm=0.0)
    weights = strategy.compute(step_inputs((matrix @ matrix.T).float())).weights.double()
    gramian = (matrix @ matrix.T).float().double()
    torch.testing.assert_close(weights * (gramian @ weights), torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)


def test_the_numpy_solver_takes_over_where_the_python_floats_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where small_bargaining_weights answers None (here forced), the numpy solver runs from the same start and
    its answer is used: the weights equal the numpy path's exactly, the state included."""
    matrix = jacobians(4, 5)[2][1]
    gramian = (matrix @ matrix.T).float()
    calls = []
    original = nash_module.bargaining_weights

    def counted(*args: object) -> object:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(nash_module, "bargaining_weights", counted)
    monkeypatch.setattr(nash_module, "small_bargaining_weights", lambda *args: None)
    answers = []
    for small in (solvers.SMALL, 0):
        monkeypatch.setattr(solvers, "SMALL", small)
        strategy = mtlzoo.create("nash_mtl", num_tasks=4, target="representation")
        answers.append(strategy.compute(step_inputs(gramian)).weights)
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[0][1], calls[1][1])  # the same start
    assert_same(answers[0], answers[1])
