"""What the gradient-surgery aggregators of issue 9 share, checked for each of them.

Training the contract tests' small regression on both targets, the representation target moving
the backbone, degenerate and non-finite input, both float dtypes standalone, the mixed-precision
loop, and each method's departure from the mean on a strong conflict (the paper's own claim, so a
method replaced by ``ls`` fails). Worked examples, properties and state are in test_<method>.py;
torchjd parity in test_surgery_reference.py; the registry-wide contract in test_contract.py.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import NonFiniteGradientError, SolverWarning
from mtlzoo.roles import GramianAggregator
from tests.helpers import batch, mse_losses, optimizer_for, small_model

SURGERY = ["mgda", "mgda_ub", "pcgrad", "graddrop", "gradvac", "cagrad", "imtl_g", "imtl", "nash_mtl", "aligned_mtl",
           "upgrad", "dualproj", "config", "fairgrad", "pcd", "excess_mtl", "db_mtl"]
WEIGHTINGS = sorted(set(SURGERY) - {"graddrop", "excess_mtl", "db_mtl"})
"""Every method but GradDrop, ExcessMTL (weights from the gradients' entries) and DB-MTL (from running averages of the
gradients) combines the task gradients with weights read from their Gramian."""
WARNS = ("nash_mtl", "fairgrad", "pcd")
"""Methods that warn (as documented) on inputs where their problem has no solution (zero or conflicting rows)."""


def targets_of(name: str) -> list[str]:
    return list(mtlzoo.get_strategy(name).cls.supported_targets)


BOTH = [(name, target) for name in SURGERY for target in targets_of(name)]


def target_option(name: str, target: str) -> dict[str, str]:
    """``target=...`` for a method with a choice of targets (DB-MTL has the parameters only)."""
    return {"target": target} if len(targets_of(name)) > 1 else {}


@contextlib.contextmanager
def may_warn(name: str) -> Iterator[None]:
    with warnings.catch_warnings():
        if name in WARNS:
            warnings.simplefilter("ignore", SolverWarning)
        yield


def training_losses(mtl: mtlzoo.MTLWrapper) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.stack(mse_losses(mtl(x), targets))
                            for x, targets in (batch(len(mtl), size=32, seed=seed) for seed in range(5))]).mean(0)


@pytest.mark.parametrize(("name", "target"), BOTH)
def test_trains_the_regression_on_both_targets_and_lowers_every_loss(name: str, target: str) -> None:
    """Through MTLWrapper, 30 Adam steps on the contract tests' regression lower each task's loss."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **target_option(name, target))
    assert mtl.strategy.request.where == target
    optimizer = optimizer_for(mtl)
    before = training_losses(mtl)
    for step in range(30):
        x, targets = batch(len(mtl), size=32, seed=step % 5)
        optimizer.zero_grad()
        with may_warn(name):
            mtl.backward(mse_losses(mtl(x), targets))
        mtl.step(optimizer)
    after = training_losses(mtl)
    assert bool((after < before).all()), f"{name} on {target}: {before.tolist()} -> {after.tolist()}"


@pytest.mark.parametrize("name", [name for name in SURGERY if "representation" in targets_of(name)])
def test_the_representation_target_moves_the_backbone(name: str) -> None:
    """A representation mode whose encoder never updates is a known defect elsewhere: here every backbone
    parameter gets a non-zero gradient and moves."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, target="representation")
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    before = [p.detach().clone() for p in mtl.backbone.parameters()]
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mtl.backbone.parameters())
    mtl.step(optimizer)
    assert all(not torch.equal(p, q) for p, q in zip(mtl.backbone.parameters(), before))


def test_the_surgery_weightings_use_the_gramian_route() -> None:
    """Every method whose update is a weighting is a GramianAggregator (IMTL: its aggregator part) and asks the engine
    for the Gramian."""
    for name in WEIGHTINGS:
        strategy = mtlzoo.create(name, num_tasks=3)
        aggregator = getattr(strategy, "aggregator", strategy)
        assert isinstance(aggregator, GramianAggregator) and strategy.request.statistic == "gramian", name
    assert mtlzoo.create("graddrop", num_tasks=3).request.statistic == "gradients"


def degenerate_matrices(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(6, generator=generator, dtype=dtype)
    generic = torch.randn(3, 6, generator=generator, dtype=dtype)
    zero_row = generic.clone()
    zero_row[1] = 0
    return {"identical": row.repeat(3, 1), "zero_row": zero_row, "zero": torch.zeros(3, 6, dtype=dtype),
            "opposite": torch.stack([row, -row, 2 * row])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SURGERY)
def test_degenerate_input_gives_a_defined_finite_result(name: str, dtype: torch.dtype) -> None:
    """One task, identical rows, a zero row, all rows zero, opposite rows: finite, of the input's dtype; one task
    gets a multiple of its own gradient (the gradient itself but for Nash-MTL's and FairGrad's clipping, CAGrad's ball
    and DB-MTL's (1 - beta))."""
    for label, matrix in degenerate_matrices(dtype).items():
        with may_warn(name):
            update = mtlzoo.create(name, num_tasks=3).aggregate(matrix, torch.ones(3, dtype=dtype))
        assert update.dtype == dtype and update.shape == (6,), label
        assert bool(torch.isfinite(update).all()), f"{name} on {label}: {update}"
    single = torch.randn(1, 6, dtype=dtype)
    update = mtlzoo.create(name, num_tasks=1).aggregate(single, torch.ones(1, dtype=dtype))
    cosine = float(update @ single[0]) / float(update.norm() * single.norm())
    assert abs(cosine - 1) < 1e-5
    if name not in ("nash_mtl", "cagrad", "fairgrad", "db_mtl"):
        torch.testing.assert_close(update, single[0])


@pytest.mark.parametrize("name", SURGERY)
def test_a_nan_gradient_is_a_clear_error_standalone(name: str) -> None:
    matrix = torch.randn(3, 6)
    matrix[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="non-finite"):
        mtlzoo.create(name, num_tasks=3).aggregate(matrix, torch.ones(3))


class NanGradient(torch.autograd.Function):
    """The identity, whose backward returns NaN: a finite loss with a NaN gradient."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


class NanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(NanGradient.apply(z))


@pytest.mark.parametrize(("name", "target"), BOTH)
def test_a_nan_gradient_never_reaches_grad_nor_the_state(name: str, target: str) -> None:
    """A finite loss whose gradient is NaN: NonFiniteGradientError, no NaN in any backbone .grad, and the strategy's
    state (its running quantities) unchanged."""
    torch.manual_seed(0)
    model = small_model()
    model.heads[1] = NanHead()
    mtl = mtlzoo.MTLWrapper(model, name, **target_option(name, target))
    state = copy.deepcopy(mtl.strategy.state_dict())
    x, targets = batch()
    with pytest.raises(NonFiniteGradientError):
        mtl.backward(mse_losses(mtl(x), targets))
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in mtl.backbone.parameters())
    assert not mtl.strategy.state.staged and str(mtl.strategy.state_dict()) == str(state)


@pytest.mark.parametrize("name", SURGERY)
def test_standalone_in_float32_and_float64(name: str) -> None:
    """aggregate(J, losses) on a K x n matrix returns (n,) in J's dtype; float32 and float64 agree over two steps
    (the running state carried from the first)."""
    generator = torch.Generator().manual_seed(1)
    matrices = [torch.randn(4, 50, generator=generator, dtype=torch.float64) for _ in range(2)]
    results = {}
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)  # the stochastic methods draw their seed from torch's generator
        strategy = mtlzoo.create(name, num_tasks=4)
        results[dtype] = []
        for matrix in matrices:
            matrix = matrix - 0.5 * matrix[0]
            with may_warn(name):
                results[dtype].append(strategy.aggregate(matrix.to(dtype), torch.ones(4, dtype=dtype)))
            strategy.advance()
        assert all(update.dtype == dtype and update.shape == (50,) for update in results[dtype])
    for low, high in zip(results[torch.float32], results[torch.float64]):
        torch.testing.assert_close(low.double(), high, rtol=1e-4, atol=1e-4 * float(high.norm()))


@pytest.mark.parametrize("name", SURGERY)
def test_the_mixed_precision_loop_trains(name: str) -> None:
    """README's loop: bfloat16 autocast, a GradScaler, two micro-batches per step; steps are taken, every
    parameter stays finite, and the model moves."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name)
    optimizer = optimizer_for(mtl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    start = copy.deepcopy(mtl.state_dict())
    taken = 0
    for step in range(4):
        x, targets = batch(len(mtl), size=32, seed=step)
        optimizer.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                predictions = mtl(x[half])
            with may_warn(name):
                mtl.backward(mse_losses([p.float() for p in predictions], targets[:, half]), scaler=scaler)
        taken += mtl.step(optimizer, scaler=scaler)
    assert taken >= 3
    assert all(bool(torch.isfinite(p).all()) for p in mtl.parameters())
    assert any(not torch.equal(value, start[key]) for key, value in mtl.state_dict().items()
               if key.startswith("backbone.") and isinstance(value, torch.Tensor))


def captured_weights(strategy: mtlzoo.Strategy) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    compute = strategy.compute

    def spy(inputs: mtlzoo.protocol.StepInputs) -> mtlzoo.protocol.Update:
        update = compute(inputs)
        seen.append(update.weights.detach().clone())
        return update

    strategy.compute = spy  # type: ignore[method-assign]
    return seen


def test_nash_mtl_gives_the_same_weights_whatever_the_loss_scale() -> None:
    """Its bargaining solution depends on the gradients' scale (||J^T alpha||^2 = K); under a GradScaler the
    strategy sees unscaled gradients, so scales 2^2 and 2^24 give the same weights and the same unscaled .grad."""
    results = []
    for scale in (2.0**2, 2.0**24):
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(small_model(), "nash_mtl")
        seen = captured_weights(mtl.strategy)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        x, targets = batch()
        mtl.backward(mse_losses(mtl(x), targets), scaler=scaler)
        results.append((seen[0], [p.grad / scale for p in mtl.backbone.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------ the paper's departure from the mean
CONFLICT = torch.tensor([[3.0, 0.0, 1.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
"""g_1 large, g_2 pulling against it: the mean (0.5, 0.5, 0.5) increases L_2 (g_2 . mean = -0.5)."""


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def pcgrad_by_hand(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Yu et al., Algorithm 1 with two tasks: each loses its component along the other."""
    return (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)


def expect_mgda(d: torch.Tensor, j: torch.Tensor) -> None:
    assert bool((j @ d >= (d @ d) - 1e-9).all())  # d . g_k >= ||d||^2: the minimum-norm point of the hull


def expect_non_conflicting(d: torch.Tensor, j: torch.Tensor) -> None:
    assert bool((j @ d >= -1e-9).all())


def expect_dualproj(d: torch.Tensor, j: torch.Tensor) -> None:
    expect_non_conflicting(d, j)
    mean = j.mean(0)  # the projection of the mean: the only cone point whose residual is normal to the cone
    assert abs(float((mean - d) @ d)) < 1e-9


def expect_pcgrad(d: torch.Tensor, j: torch.Tensor) -> None:
    torch.testing.assert_close(d, pcgrad_by_hand(j[0], j[1]))


def expect_cagrad(d: torch.Tensor, j: torch.Tensor) -> None:
    c, size = 0.4, j.shape[0]
    direction = d * (1 + c**2) / size  # undo the authors' rescaling and factor K
    mean = j.mean(0)
    assert float((direction - mean).norm()) <= c * float(mean.norm()) + 1e-9  # within the ball
    assert float((j @ direction).min()) > float((j @ mean).min()) + 0.1  # a better worst task than the mean


def expect_imtl_g(d: torch.Tensor, j: torch.Tensor) -> None:
    projections = (j / j.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections[0], projections[1])


def expect_nash(d: torch.Tensor, j: torch.Tensor) -> None:
    products = j @ d  # = 1 / alpha_k > 0: every task gains
    assert bool((products > 0).all())


def expect_aligned(d: torch.Tensor, j: torch.Tensor) -> None:
    weights = torch.linalg.lstsq(j.T, d.unsqueeze(1)).solution.squeeze(1)  # d = J^T B 1
    gramian = j @ j.T
    eigenvalues, vectors = torch.linalg.eigh(gramian)
    balance = eigenvalues.min().sqrt() * vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T
    torch.testing.assert_close(weights, balance @ torch.ones(2, dtype=j.dtype))
    aligned = balance @ j  # the aligned gradients are orthogonal and of one size
    torch.testing.assert_close(aligned @ aligned.T, eigenvalues.min() * torch.eye(2, dtype=j.dtype))


def expect_graddrop(d: torch.Tensor, j: torch.Tensor) -> None:
    """Each element keeps the positive or the negative gradients, never both (leak 0)."""
    positive, negative = j.clamp(min=0).sum(0), j.clamp(max=0).sum(0)
    assert bool(((d == positive) | (d == negative)).all())
    assert not torch.equal(d, j.sum(0))


EXPECTATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "mgda": expect_mgda, "mgda_ub": expect_mgda, "upgrad": expect_non_conflicting, "dualproj": expect_dualproj,
    "pcgrad": expect_pcgrad, "gradvac": expect_pcgrad, "cagrad": expect_cagrad, "imtl_g": expect_imtl_g,
    "imtl": expect_imtl_g, "nash_mtl": expect_nash, "aligned_mtl": expect_aligned, "graddrop": expect_graddrop,
}
"""What each paper says of its update on a strong conflict. GradVac's targets start at 0, where it is PCGrad."""


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))  # the newer methods': test_surgery2.py
def test_on_a_strong_conflict_the_update_departs_from_the_mean_as_the_paper_says(name: str) -> None:
    kwargs = {"nash_mtl": {"max_norm": 0.0}, "graddrop": {"target": "parameters", "rescale_norm": False}}.get(name, {})
    update = mtlzoo.create(name, num_tasks=2, **kwargs).aggregate(CONFLICT, torch.ones(2, dtype=torch.float64))
    EXPECTATIONS[name](update, CONFLICT)
    for plain in (CONFLICT.mean(0), CONFLICT.sum(0)):  # what ls would give, up to its scale
        assert float((unit(update) - unit(plain)).norm()) > 1e-3


def reject_ls(expectations: dict[str, Callable[[torch.Tensor, torch.Tensor], None]]) -> None:
    """Each expectation rejects the plain sum (ls) on the conflict: none is a test that ls would pass."""
    summed = CONFLICT.sum(0)
    for name, expect in expectations.items():
        with pytest.raises(AssertionError):
            expect(summed, CONFLICT)
            raise pytest.fail.Exception(f"the expectation of {name} accepts ls")  # pragma: no cover


def test_the_conflict_expectations_fail_for_ls() -> None:
    reject_ls(EXPECTATIONS)


def test_strategies_never_import_the_engine() -> None:
    """DESIGN.md: strategies are maths over tensors; only the engine (mtlzoo/engine/) asks autograd for per-task
    gradients. No module of mtlzoo/strategies or mtlzoo/roles (nor linalg.py, solvers.py) imports it, but for the
    one question RotoGrad's fold asks of a head's structure (mtlzoo.engine.leading_linear)."""
    import ast
    from pathlib import Path

    package = Path(mtlzoo.__file__).parent
    for path in [*sorted((package / "strategies").glob("*.py")), *sorted((package / "roles").glob("*.py")),
                 package / "linalg.py", package / "solvers.py"]:
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module for alias in node.names}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        engine = {name for name in imported if name == "mtlzoo.engine" or name.startswith("mtlzoo.engine.")}
        assert engine <= {"mtlzoo.engine.leading_linear", "mtlzoo.engine.leading_linear.leading_linear"}, path.name
        assert "mtlzoo.wrapper" not in imported, path.name
