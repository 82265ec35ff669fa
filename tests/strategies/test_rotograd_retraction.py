"""RotoGrad's fast ``orthogonal_map="retraction"``: tangent parameters, closed-form gradient, retraction per step.

References: torch's own orthogonal parametrization (``cayley`` and ``matrix_exp`` trivializations,
the same coordinates ``A = tril(X) - tril(X)^T``) for the gradient at a given rotation; finite
differences of the objective through ``R exp(A)`` in float64; the definition of SO(n)
(``R^T R = I``, ``det R = +1``); the step protocol (a skipped step changes nothing).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import StepInputs
from mtlzoo.strategies import RotateOnly
from mtlzoo.strategies._rotation_bank import (
    CHECK_EVERY,
    POLAR_TOLERANCE,
    haar_rotations,
    packed_lower,
    polar_project,
    skew_from_tangents,
)
from tests.helpers import assert_same_state, batch, mse_losses, optimizer_for, small_model, train_steps

FAMILY = ["rotate_only", "rotograd", "rotograd_norm"]


def options(name: str, **kwargs: object) -> dict:
    return {"alpha": 1.0, **kwargs} if name == "rotograd_norm" else dict(kwargs)


def orthogonality_error(matrices: torch.Tensor) -> float:
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype)
    return float((matrices.mT @ matrices - eye).abs().max())


def channel_model(num_tasks: int = 3) -> mtlzoo.HardSharing:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh())
    heads = [torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 3, 1))
             for _ in range(num_tasks)]
    return mtlzoo.HardSharing(backbone, heads)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("layout", ["flat", "channels"])
@pytest.mark.parametrize("trivialization", ["cayley", "matrix_exp"])
def test_gradient_equals_the_trivializations_at_the_same_rotation(name: str, layout: str, trivialization: str) -> None:
    """Reference: torch's parametrization with base R reads the same coordinates X (A = tril(X) - tril(X)^T), and
    at X = 0 both maps have derivative identity, so the gradient w.r.t. X must be the same, for the sum over the
    batch (flat) and the mean (post_shape). Fails with a missing transpose, a wrong factor, or the Euclidean
    gradient of R instead of the tangent one. The tangents hold X's entries below the diagonal only: the
    trivializations' gradient is zero on and above it (so the packing drops nothing), and a packing that misplaced
    an entry (column-major, say) fails the comparison."""
    torch.manual_seed(2)
    model = small_model(dim=5) if layout == "flat" else channel_model()
    shapes = {"rotation_shape": 5} if layout == "flat" else {"rotation_shape": 3, "post_shape": (4, 3)}
    x, targets = batch(size=8) if layout == "flat" else (torch.randn(4, 2, 4, 3), torch.randn(3, 4, 1))
    rotations = haar_rotations(3, shapes["rotation_shape"])
    grads = {}
    for orthogonal_map in (trivialization, "retraction"):
        mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), name, orthogonal_map=orthogonal_map, **options(name, **shapes))
        mtl.strategy.rotations = rotations
        mtl.backward(mse_losses(mtl(x), targets))
        assert mtl.strategy.bank is not None
        grads[orthogonal_map] = torch.stack([module.parametrizations.weight.original.grad
                                             if orthogonal_map != "retraction" else module.tangent.grad
                                             for module in mtl.strategy.bank.matrices])
    full = grads[trivialization]
    assert full.triu().abs().max() == 0, "torch's trivialization reads X below the diagonal only"
    expected = packed_lower(full)
    assert expected.abs().max() > 1e-4
    assert grads["retraction"].shape == expected.shape
    torch.testing.assert_close(grads["retraction"], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_gradient_matches_finite_differences_of_the_objective() -> None:
    """Reference: central finite differences, in float64, of sum_k sum_b ||R_k e^{A_k} v_b - C_{k,b}||^2 in the
    coordinates X_k at X_k = 0, with C = R^{sg} g (held fixed, RotoGrad's stop-gradient) and v, g from the step."""
    torch.manual_seed(4)
    strategy: RotateOnly = mtlzoo.create("rotate_only", num_tasks=2, rotation_shape=4,  # type: ignore[assignment]
                                         orthogonal_map="retraction").double()
    grads = torch.randn(2, 6, 4, dtype=torch.float64)
    strategy.aggregate(grads, torch.ones(2, dtype=torch.float64))
    assert strategy.bank is not None
    analytic = torch.stack([module.tangent.grad for module in strategy.bank.matrices])

    rotations = strategy.rotations.detach()
    norms = grads.flatten(1).norm(dim=1)
    reference = (grads * (grads.mean(0).norm() / norms).view(-1, 1, 1)).mean(0)
    fixed = torch.einsum("kij,kbj->kbi", rotations, grads)

    def objective(tangents: torch.Tensor) -> torch.Tensor:
        lower = torch.zeros(2, 4, 4, dtype=torch.float64)
        rows, cols = torch.tril_indices(4, 4, -1)
        lower[:, rows, cols] = tangents  # X's entries below the diagonal, row by row
        moved = rotations @ torch.linalg.matrix_exp(lower - lower.mT)
        return (torch.einsum("kij,bj->kbi", moved, reference) - fixed).pow(2).sum()

    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    for index in itertools.product(*(range(n) for n in analytic.shape)):
        step = torch.zeros_like(analytic)
        step[index] = eps
        numeric[index] = (objective(step) - objective(-step)) / (2 * eps)
    assert analytic.abs().max() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("post_shape", [(), (3,)])
@pytest.mark.parametrize("present", [(0, 1, 2), (0, 2)])
def test_objective_value_is_the_sum_of_squared_residuals(post_shape: tuple[int, ...], present: tuple[int, ...]) -> None:
    """Reference: the definition, sum_k reduce_b ||v_b - g_{k,b}||^2 at X = 0 (summed over the batch when post_shape
    is empty, averaged otherwise), computed directly; the engine's value comes from the norms instead (K ||v||^2 -
    2 K <v, mean_k g_k> + sum_k ||g_k||^2); a wrong sign or factor there fails, with all tasks and with one absent."""
    torch.manual_seed(6)
    strategy: RotateOnly = mtlzoo.create("rotate_only", num_tasks=3, rotation_shape=4,  # type: ignore[assignment]
                                         post_shape=post_shape, orthogonal_map="retraction").double()
    grads = torch.randn(len(present), 5, 4, *post_shape, dtype=torch.float64)
    tasks = torch.tensor(present)
    inputs = StepInputs(torch.ones(len(present), dtype=torch.float64), tasks, 3, gradients=grads)
    objective = strategy.compute(inputs).objective
    assert objective is not None
    norms = grads.flatten(1).norm(dim=1)
    reference = (grads * (grads.mean(0).norm() / norms).view(-1, *[1] * (grads.dim() - 1))).mean(0)
    expected = (reference - grads).pow(2).sum() / (5 if post_shape else 1)
    torch.testing.assert_close(objective.detach(), expected, rtol=1e-10, atol=0)
    objective.backward()
    assert strategy.bank is not None
    untouched = [k for k in range(3) if k not in present]
    assert all(strategy.bank.matrices[k].tangent.grad is None for k in untouched)


@pytest.mark.parametrize("size", [6, 48])
def test_rotations_stay_in_so_n_under_large_steps(size: int) -> None:
    """Reference: SO(n). Adam at 0.05 on the rotations (the original's toy example) for 150 steps: after every taken
    step R^T R = I to 2e-5 and det R = +1, while the rotations travel far (so a retraction that did nothing would
    fail), and the truncated exponential alone would drift (its error is ||A||^4 / 4 per step, projected here)."""
    torch.manual_seed(size)
    model = small_model(dim=size)
    mtl = mtlzoo.MTLWrapper(model, "rotograd", rotation_shape=size, orthogonal_map="retraction")
    start = mtl.strategy.rotations.clone()
    optimizer = torch.optim.Adam([{"params": list(mtl.model_parameters()), "lr": 1e-3},
                                  {"params": mtl.strategy_parameters(), "lr": 0.05}])
    for step in range(150):
        x, targets = batch(seed=step)
        optimizer.zero_grad()
        mtl.backward(mse_losses(mtl(x), targets))
        assert mtl.step(optimizer)
        rotations = mtl.strategy.rotations
        assert orthogonality_error(rotations) <= 2e-5, f"step {step}"
        assert torch.all(torch.linalg.det(rotations.double()) > 0.999)
        assert all(not p.detach().any() for p in mtl.strategy_parameters()), "tangents back to zero"
    assert (mtl.strategy.rotations - start).abs().max() > 0.5


@pytest.mark.parametrize("size", [2, 8, 64])
@pytest.mark.parametrize("scale", [1e-3, 0.05, 0.4])
def test_truncated_exponential_error_is_within_its_bound(size: int, scale: float) -> None:
    """Reference: the algebra of SO(n). For skew A and M = I + A + A^2 / 2, M^T M - I = A^4 / 4, whose 2-norm the
    retraction bounds by ||A^2||_F^2 / 4: checked in float64 on random skew matrices and on a rank-2 one (a plane
    rotation's generator, where the bound is tight). Fails if the bound were taken from a quantity smaller than
    ||A^2||_2^2 / 4 (||A^2||_2^2 / 8, or the mean entry)."""
    torch.manual_seed(size)
    random = torch.randn(size, size, dtype=torch.float64) * scale
    plane = torch.zeros(size, size, dtype=torch.float64)
    plane[0, 1] = scale * size
    for x in (random, plane):
        skew = x.tril(-1) - x.tril(-1).mT
        square = skew @ skew
        step = torch.eye(size, dtype=torch.float64) + skew + square / 2
        error = torch.linalg.matrix_norm(step.mT @ step - torch.eye(size, dtype=torch.float64), ord=2)
        torch.testing.assert_close(step.mT @ step - torch.eye(size, dtype=torch.float64),
                                   torch.linalg.matrix_power(skew, 4) / 4, rtol=1e-9, atol=1e-15)
        bound = float(torch.linalg.matrix_norm(square)) ** 2 / 4
        assert float(error) <= bound * (1 + 1e-9) + 1e-15
    assert float(error) >= 0.99 * bound  # tight for the plane rotation


def test_adam_like_steps_are_retracted_without_a_projection_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Adam step moves every entry of A by about its learning rate: at n = 128, lr = 5e-4 the loose bound
    ||A||_F^4 / 4 (about 4e-6) exceeds the per-step budget POLAR_TOLERANCE / CHECK_EVERY while ||A^2||_F^2 / 4
    (about 1e-7) does not; 15 such steps keep the rotations orthogonal to 1e-5 with no projection (a projection
    is two more n^3 products per step). Fails with the loose bound (a projection after every step)."""
    from mtlzoo.strategies import _rotation_bank

    projections = []
    original = _rotation_bank.polar_project
    monkeypatch.setattr(_rotation_bank, "polar_project", lambda m, *a: projections.append(1) or original(m, *a))
    torch.manual_seed(0)
    bank = _rotation_bank.RotationBank(4, 128, orthogonal_map="retraction", init="random")
    for _ in range(CHECK_EVERY - 1):
        with torch.no_grad():
            for module in bank.matrices:
                module.tangent.copy_(5e-4 * torch.randint(0, 2, module.tangent.shape).float().mul(2).sub(1))
        skew = skew_from_tangents(torch.stack([module.tangent.detach() for module in bank.matrices]), 128)
        assert float(skew.norm(dim=(-2, -1)).amax()) ** 4 / 4 > 4 * POLAR_TOLERANCE / CHECK_EVERY
        bank.retract(check=False)
        assert orthogonality_error(bank.weight) <= 1e-5
    assert projections == []


def test_polar_projection_gives_the_nearest_rotation() -> None:
    """Reference: the SVD polar factor U V^T (the nearest orthogonal matrix) of perturbed rotations, small
    perturbations through Newton-Schulz and a large one (beyond the fallback bound) through the SVD."""
    torch.manual_seed(0)
    rotations = haar_rotations(3, 16, dtype=torch.float64)
    for scale in (1e-3, 0.05):
        perturbed = rotations + scale * torch.randn(3, 16, 16, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(perturbed)
        expected = u @ vh
        assert torch.all(torch.linalg.det(expected) > 0)
        projected = polar_project(perturbed, tolerance=1e-12)
        torch.testing.assert_close(projected, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", FAMILY)
def test_a_skipped_step_neither_retracts_nor_changes_state(name: str) -> None:
    """Protocol: a step that the GradScaler skips (inf gradients) leaves the whole state bit for bit, and the
    retraction runs only in the commit of a taken step (counted), which then moves the rotations."""
    torch.manual_seed(1)
    mtl = mtlzoo.MTLWrapper(small_model(), name, orthogonal_map="retraction", **options(name, rotation_shape=4))
    optimizer = optimizer_for(mtl)
    assert mtl.strategy.bank is not None
    calls = []
    retract = mtl.strategy.bank.retract
    mtl.strategy.bank.retract = lambda check: (calls.append(check), retract(check))  # type: ignore[method-assign]
    train_steps(mtl, optimizer, steps=2)
    assert len(calls) == 2
    before = copy.deepcopy(mtl.state_dict())

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled losses overflow: the step is skipped
    x, targets = batch(seed=5)
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets), scaler=scaler)
    assert not mtl.step(optimizer, scaler=scaler)
    assert len(calls) == 2
    assert_same_state(before, mtl.state_dict())

    train_steps(mtl, optimizer, steps=1, first_seed=6)
    assert len(calls) == 3
    assert (mtl.strategy.rotations - before["strategy.adapter.bank.matrices.0.rotation"]).abs().max() > 0


@pytest.mark.parametrize("name", FAMILY)
def test_a_checkpoint_resumes_bit_for_bit_across_a_check_step(name: str) -> None:
    """Protocol: state_dict holds the rotations, the zero tangents and the step counter; 6 steps, a checkpoint,
    then 18 more (across step CHECK_EVERY = 16, where the orthogonality is measured) equal a resumed run's."""
    assert 6 < CHECK_EVERY < 24
    torch.manual_seed(1)
    mtl = mtlzoo.MTLWrapper(small_model(), name, orthogonal_map="retraction", **options(name, rotation_shape=4))
    optimizer = optimizer_for(mtl)
    train_steps(mtl, optimizer, steps=6, backbone_loss=True)
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    train_steps(mtl, optimizer, steps=18, first_seed=100, backbone_loss=True)

    torch.manual_seed(7)
    resumed = mtlzoo.MTLWrapper(small_model(), name, orthogonal_map="retraction", **options(name, rotation_shape=4))
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, resumed_optimizer, steps=18, first_seed=100, backbone_loss=True)
    assert_same_state(mtl.state_dict(), resumed.state_dict())


def test_training_follows_the_exponential_trivialization_for_small_steps() -> None:
    """Reference: the matrix_exp trivialization (the original's). From the same rotations, 20 Adam steps at 1e-3 on
    the rotations (model frozen, float64): the rotations differ by second-order amounts, under 2% of how far they
    moved; a gradient of the wrong sign or scale, or a retraction along another direction, would not."""
    torch.manual_seed(3)
    model = small_model(dim=5).double()
    rotations = haar_rotations(3, 5, dtype=torch.float64)
    final = {}
    for orthogonal_map in ("matrix_exp", "retraction"):
        mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), "rotograd", rotation_shape=5,
                                orthogonal_map=orthogonal_map).double()
        mtl.strategy.rotations = rotations
        optimizer = torch.optim.Adam(mtl.strategy_parameters(), lr=1e-3)
        for step in range(20):
            x, targets = batch(seed=step)
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x.double()), targets.double()))
            mtl.step(optimizer)
        final[orthogonal_map] = mtl.strategy.rotations.detach()
    moved = (final["matrix_exp"] - rotations).norm()
    assert moved > 1e-2
    assert (final["retraction"] - final["matrix_exp"]).norm() < 0.02 * moved


def test_task_models_and_bf16_autocast_use_the_float32_rotations() -> None:
    """mtl[k] applies task k's current rotation (its prediction equals the wrapper's), and with the whole step under
    bf16 autocast the rotations stay float32 rotations to 1e-5 (autocast off for them, as for torch's maps; a bf16
    product in the retraction would leave errors near 1e-2)."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, orthogonal_map="retraction")
    optimizer = optimizer_for(mtl)
    for step in range(5):
        x, targets = batch(seed=step)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictions = mtl(x)
            mtl.backward(mse_losses([p.float() for p in predictions], targets))
            mtl.step(optimizer)  # the retraction's products in float32 all the same
    rotations = mtl.strategy.rotations
    assert rotations.dtype == torch.float32 and orthogonality_error(rotations) <= 1e-5
    mtl.eval()
    x, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(mtl[1](x), mtl(x)[1])


def test_a_lazy_strategy_materialises_its_rotations_from_a_state_dict() -> None:
    """A strategy without rotation_shape creates its rotations (buffers and tangents) from the checkpoint's shapes."""
    torch.manual_seed(0)
    trained = mtlzoo.create("rotograd", num_tasks=3, rotation_shape=4, orthogonal_map="retraction")
    lazy = mtlzoo.create("rotograd", num_tasks=3, orthogonal_map="retraction")
    lazy.load_state_dict(trained.state_dict(), strict=False)  # the hyperparameters differ: rotation_shape
    torch.testing.assert_close(lazy.rotations, trained.rotations, rtol=0, atol=0)
    assert [p.shape for p in lazy.parameters()] == [torch.Size([6])] * 3  # 4 * 3 / 2 entries below the diagonal


def test_tangents_pack_the_entries_below_the_diagonal_row_by_row() -> None:
    """Reference: torch.tril_indices (row-major, as torch's trivialization reads tril(X)) and A = tril(X, -1) -
    tril(X, -1)^T computed directly. Fails with a column-major packing, the diagonal kept, or a sign flipped."""
    full = torch.randn(3, 5, 5, dtype=torch.float64)
    rows, cols = torch.tril_indices(5, 5, -1)
    packed = packed_lower(full)
    torch.testing.assert_close(packed, full[:, rows, cols], rtol=0, atol=0)
    lower = full.tril(-1)
    torch.testing.assert_close(skew_from_tangents(packed, 5), lower - lower.mT, rtol=0, atol=0)


def test_a_checkpoint_with_full_square_tangents_still_loads() -> None:
    """Checkpoints written before the tangents were packed hold an n x n X: it loads, its entries below the
    diagonal kept, into the same rotations."""
    torch.manual_seed(1)
    saved = mtlzoo.create("rotate_only", num_tasks=2, rotation_shape=4, orthogonal_map="retraction")
    state = saved.state_dict()
    full = torch.randn(4, 4)
    state["bank.matrices.1.tangent"] = full
    state["bank.matrices.0.tangent"] = torch.zeros(4, 4)
    loaded = mtlzoo.create("rotate_only", num_tasks=2, rotation_shape=4, orthogonal_map="retraction")
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.rotations, saved.rotations, rtol=0, atol=0)
    assert loaded.bank is not None
    torch.testing.assert_close(loaded.bank.matrices[1].tangent.detach(), packed_lower(full), rtol=0, atol=0)
