"""RotateOnly, RotoGrad and RotoGradNorm: properties from the paper and from the original's semantics.

Numerical parity with the original package is in test_rotograd_reference.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import mtlzoo
from mtlzoo.errors import ShapeMismatchError
from mtlzoo.protocol import StepInputs
from mtlzoo.strategies import RotateOnly, RotoGrad, RotoGradNorm
from mtlzoo.strategies._rotation_bank import ORTHOGONAL_MAPS, haar_rotations
from tests.helpers import batch, mse_losses, small_model

FAMILY = ["rotate_only", "rotograd", "rotograd_norm"]


def make(name: str, **kwargs: object) -> RotateOnly:
    if name == "rotograd_norm":
        kwargs.setdefault("alpha", 1.0)
    return mtlzoo.create(name, **kwargs)  # type: ignore[return-value]


def assert_rotations(matrices: torch.Tensor) -> None:
    eye = torch.eye(matrices.shape[-1]).expand_as(matrices)
    torch.testing.assert_close(matrices.mT @ matrices, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(matrices), torch.ones(matrices.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_rotations_start_random_in_so_n_or_at_identity(orthogonal_map: str) -> None:
    torch.manual_seed(5)
    first = make("rotograd", num_tasks=3, rotation_shape=5, orthogonal_map=orthogonal_map).rotations.detach()
    torch.manual_seed(5)
    again = make("rotograd", num_tasks=3, rotation_shape=5, orthogonal_map=orthogonal_map).rotations.detach()
    assert_rotations(first)
    torch.testing.assert_close(first, again)
    assert (first[0] - first[1]).abs().max() > 0.1
    identity = make("rotograd", num_tasks=3, rotation_shape=5, rotation_init="identity", orthogonal_map=orthogonal_map)
    torch.testing.assert_close(identity.rotations.detach(), torch.eye(5).expand(3, 5, 5), atol=1e-6, rtol=0)


def test_haar_samples_are_proper_rotations_in_high_dimension() -> None:
    """det = +1 also where a plain determinant's product of pivots underflows in float32."""
    samples = haar_rotations(2, 512)
    assert torch.equal(torch.linalg.slogdet(samples[0]).sign, torch.tensor(1.0))
    assert torch.equal(torch.linalg.slogdet(samples[1]).sign, torch.tensor(1.0))
    assert (samples.mT @ samples - torch.eye(512)).abs().max() < 1e-4


def test_haar_samples_are_uniform_on_average() -> None:
    """Haar measure: E[R] = 0 for n >= 2 (each entry's mean vanishes)."""
    samples = haar_rotations(4000, 3)
    assert_rotations(samples[:50])
    assert samples.mean(0).abs().max() < 0.05


@pytest.mark.parametrize("orthogonal_map", ORTHOGONAL_MAPS)
def test_setting_rotations_goes_through_the_parametrization(orthogonal_map: str) -> None:
    strategy = make("rotate_only", num_tasks=2, rotation_shape=4, orthogonal_map=orthogonal_map)
    target = haar_rotations(2, 4)
    strategy.rotations = target
    torch.testing.assert_close(strategy.rotations.detach(), target)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 4, 4\)"):
        strategy.rotations = haar_rotations(2, 3)
    with pytest.raises(ShapeMismatchError, match=r"\(2, n, n\)"):
        strategy.rotations = haar_rotations(3, 4)
    with pytest.raises(ValueError, match="orthogonal"):
        strategy.rotations = 2 * target
    torch.testing.assert_close(strategy.rotations.detach(), target)  # a refused value changes nothing


def test_setting_rotations_materialises_a_lazy_strategy() -> None:
    strategy = make("rotograd", num_tasks=2)
    target = haar_rotations(2, 6, dtype=torch.float64)
    strategy.rotations = target
    assert strategy.rotations.dtype == torch.float64 and strategy.rotation_shape is None
    z = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(strategy.adapt(z, 1), z @ target[1].T)
    assert strategy.rotation_shape == (6,)


def test_adapt_rotates_only_the_rotation_dimensions() -> None:
    flat = make("rotograd", num_tasks=2, rotation_shape=4)
    z = torch.randn(5, 4)
    torch.testing.assert_close(flat.adapt(z, 1), z @ flat.rotations[1].detach().T)

    channels = make("rotograd", num_tasks=2, rotation_shape=3, post_shape=(2, 2))
    image = torch.randn(5, 3, 2, 2)
    expected = torch.einsum("ij,bjhw->bihw", channels.rotations[0].detach(), image)
    torch.testing.assert_close(channels.adapt(image, 0), expected)

    whole = make("rotograd", num_tasks=2)  # inferred: every dimension after the batch one
    whole.adapt(image, 0)
    assert whole.rotation_shape == (3, 2, 2) and whole.rotations.shape == (2, 12, 12)
    with pytest.raises(ShapeMismatchError, match="rotation_shape"):
        whole.adapt(torch.randn(5, 3, 2, 3), 0)
    with pytest.raises(ShapeMismatchError, match="post_shape"):
        channels.adapt(torch.randn(5, 3, 4), 0)


def test_lazy_strategy_materialises_from_a_state_dict() -> None:
    source = make("rotograd", num_tasks=2, rotation_shape=(3, 2))
    target = make("rotograd", num_tasks=2)
    target.load_state_dict(source.state_dict())
    assert target.rotation_shape == (3, 2)
    torch.testing.assert_close(target.rotations.detach(), source.rotations.detach())


def test_rotations_align_the_task_gradients() -> None:
    """The paper's claim: rotations make the K gradients w.r.t. z point the same way.

    The heads' gradients dL_k/dz_k are held fixed; the backbone then receives g_k = R_k^T dL_k/dz_k.
    """
    torch.manual_seed(1)
    strategy = make("rotate_only", num_tasks=3, rotation_shape=4)
    optimizer = torch.optim.Adam(strategy.parameters(), lr=0.05)
    head_grads = torch.randn(3, 1, 4)

    def backbone_grads() -> torch.Tensor:
        return torch.einsum("kji,kbj->kbi", strategy.rotations.detach(), head_grads)

    def cosines() -> torch.Tensor:
        flat = torch.nn.functional.normalize(backbone_grads().flatten(1), dim=1)
        return flat @ flat.T

    assert cosines().min() < 0.5
    for _ in range(300):
        optimizer.zero_grad()
        strategy.aggregate(backbone_grads(), torch.ones(3))
        optimizer.step()
        strategy.advance()
    assert cosines().min() > 0.999


def test_rotograd_gives_every_task_the_same_magnitude() -> None:
    strategy: RotoGrad = make("rotograd", num_tasks=3, rotation_shape=4, burn_in_period=5)
    scales = torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1)
    grads = torch.randn(3, 8, 4) * scales
    norms = grads.flatten(1).norm(dim=1)
    update = strategy.aggregate(grads, torch.ones(3))
    strategy.advance()
    # At t_0 every convergence ratio is 1, so the common magnitude is the mean norm.
    torch.testing.assert_close(update, torch.tensordot(norms.mean() / norms, grads, 1))
    later = grads * torch.tensor([0.5, 1.0, 1.0]).view(3, 1, 1)  # task 0 converges faster
    update = strategy.aggregate(later, torch.ones(3))
    later_norms = later.flatten(1).norm(dim=1)
    ratios = later_norms / norms
    common = (ratios / ratios.sum() * later_norms).sum()
    torch.testing.assert_close(update, torch.tensordot(common / later_norms, later, 1))
    assert later_norms.min() <= common <= later_norms.max()


def test_rotograd_norm_weights_equalise_weighted_gradient_norms() -> None:
    """GradNorm's fixed point: with equal loss ratios, w_k ||g_k|| is the same for every task.

    The gradients share one direction (what the rotations achieve), so the target
    ||(1/K) sum_k w_k g_k|| is the mean weighted norm and the fixed point is reachable.
    """
    strategy: RotoGradNorm = make("rotograd_norm", num_tasks=3, rotation_shape=4, alpha=1.0)
    optimizer = torch.optim.Adam([strategy.weight_logits], lr=0.02)
    grads = torch.randn(1, 8, 4) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    for _ in range(500):
        optimizer.zero_grad()
        strategy.aggregate(grads, torch.ones(3))
        optimizer.step()
        strategy.advance()
    weighted = strategy.task_weights.detach() * grads.flatten(1).norm(dim=1)
    torch.testing.assert_close(strategy.task_weights.sum(), torch.tensor(3.0))
    assert (weighted.max() - weighted.min()) / weighted.mean() < 0.05


def normalised(strategy: RotateOnly, losses: list[float], micro_batch: int = 0) -> list[float]:
    """The losses as the model learns from them in one backward: ``w_k L_k``."""
    inputs = StepInputs(torch.tensor(losses), torch.arange(len(losses)), strategy.num_tasks, micro_batch=micro_batch)
    weights = strategy.loss_weights(inputs)
    return (inputs.losses if weights is None else inputs.losses * weights).tolist()


def test_losses_are_normalised_by_their_values_at_step_zero_and_burn_in() -> None:
    strategy = make("rotate_only", num_tasks=2, rotation_shape=2, normalize_losses=True, burn_in_period=2)
    seen = []
    for losses in ([2.0, 4.0], [1.0, 1.0], [0.5, 8.0], [1.0, 4.0]):
        seen.append(normalised(strategy, losses))
        strategy.advance()
    assert seen == [[1.0, 1.0], [0.5, 0.25], [1.0, 1.0], [2.0, 0.5]]
    raw = make("rotate_only", num_tasks=2, rotation_shape=2)
    assert normalised(raw, [2.0, 4.0]) == [2.0, 4.0]
    assert raw.adapter.state.initial_losses.tolist() == [2.0, 4.0]  # staged: recorded at step 0 all the same


@pytest.mark.parametrize("name", FAMILY)
def test_rotations_are_computed_once_per_step(name: str) -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), name, rotation_shape=4, orthogonal_map="cayley",
                            **({"alpha": 1.0} if "norm" in name else {}))
    calls = []
    for rotation in mtl.strategy.bank.matrices:
        rotation.parametrizations.weight[0].register_forward_hook(lambda *args: calls.append(1))
    x, targets = batch()
    with mtlzoo.cached():
        mtl.backward(mse_losses(mtl(x), targets))
    assert len(calls) == 3  # once per task
    mtl.backward(mse_losses(mtl(x), targets))
    assert len(calls) == 9  # without the user's block: once in the forward, once in the backward


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rotation_shape": 0}, "rotation_shape"),
    ({"rotation_shape": ()}, "rotation_shape"),
    ({"post_shape": (2, -1)}, "post_shape"),
    ({"burn_in_period": -1}, "burn_in_period"),
    ({"normalize_losses": "yes"}, "normalize_losses"),
    ({"orthogonal_map": "expm"}, "orthogonal_map"),
    ({"rotation_init": "zeros"}, "rotation_init"),
])
def test_invalid_hyperparameters_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{message}` should be"):
        make("rotograd", num_tasks=2, **kwargs)


def test_rotograd_norm_requires_a_valid_alpha() -> None:
    with pytest.raises(TypeError, match="alpha"):
        mtlzoo.create("rotograd_norm", num_tasks=2)
    with pytest.raises(ValueError, match="Parameter `alpha` should be"):
        mtlzoo.create("rotograd_norm", num_tasks=2, alpha=-1.0)


def test_accumulation_counts_one_step_and_takes_references_from_the_first_micro_batch() -> None:
    """Issue 6: two micro-batches count one step towards burn_in_period; references come from the first one.

    Before the redesign the step counter advanced per backward and each micro-batch took its own reference."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, normalize_losses=True, burn_in_period=2)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.01)
    for step in range(4):
        x, targets = batch(seed=step, size=16)
        optimizer.zero_grad()
        firsts = []
        for half in (slice(0, 8), slice(8, 16)):
            losses = mse_losses(mtl(x[half]), targets[:, half])
            firsts.append(torch.stack(losses).detach())
            mtl.backward(losses)
        mtl.step(optimizer)
        assert mtl.strategy.step == step + 1
        if step in (0, 2):
            reference = firsts[0]
        torch.testing.assert_close(mtl.strategy.initial_losses, reference)


def bf16_training(name: str, use_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **({"alpha": 1.0} if name == "rotograd_norm" else {}))
    x, targets = batch(size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        mtl(x)  # materialised under autocast
    assert all(p.dtype == torch.float32 for p in mtl.strategy.parameters())
    optimizer = torch.optim.Adam([{"params": list(mtl.model_parameters())},
                                  {"params": mtl.strategy_parameters(), "lr": 0.01}], lr=0.01)

    def losses() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictions = mtl(x)
        return torch.stack([((p.float() - t) ** 2).mean() for p, t in zip(predictions, targets)])

    with torch.no_grad():
        before = losses()
    for _ in range(30):
        optimizer.zero_grad()
        with mtlzoo.cached() if use_cache else contextlib.nullcontext():
            mtl.backward(list(losses()))  # the backward outside autocast, as documented
        mtl.step(optimizer)
    with torch.no_grad():
        return before, losses()


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("name", FAMILY)
def test_bf16_autocast_training_lowers_every_loss(name: str, use_cache: bool) -> None:
    """Issue 6: under bf16 autocast (backward outside it) RotoGrad failed with a dtype mismatch without
    cached(), and a lazily shaped strategy created under autocast got bf16 rotations."""
    before, after = bf16_training(name, use_cache)
    assert bool((after < before).all()), (before.tolist(), after.tolist())


def test_a_zero_task_gradient_in_half_precision_stays_finite() -> None:
    """Issue 6: EPSILON = 1e-15 is 0 in fp16, so a zero task gradient became NaN."""
    strategy = make("rotograd", num_tasks=2, rotation_shape=3)
    grads = torch.zeros(2, 4, 3, dtype=torch.float16)
    grads[0] = torch.randn(4, 3).half()
    update = strategy.aggregate(grads, torch.ones(2))
    assert torch.isfinite(update).all() and update.dtype == torch.float16
    assert all(torch.isfinite(p.grad).all() for p in strategy.parameters() if p.grad is not None)


def test_the_strategy_sees_unscaled_gradients_under_a_grad_scaler() -> None:
    """Issue 6: with scaler=..., RotoGrad's reference norms and the model's unscaled gradients match a run without."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**20)):
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
        optimizer = torch.optim.SGD(mtl.parameters(), lr=0.0)
        x, targets = batch()
        mtl.backward(mse_losses(mtl(x), targets), scaler=scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p.grad.clone() for p in mtl.parameters()]
        mtl.step(optimizer, scaler=scaler)
        results.append((mtl.strategy.initial_grad_norms.clone(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", FAMILY)
def test_issue_19_item_16_a_zero_row_in_float64_gives_the_float32_strategys_update(name: str) -> None:
    """Item 16: rotograd's standalone aggregate returned NaN for a zero row given float64 input to a float32
    strategy (the norm's floor, tiny(float64), was 0 as a float32 reference, and 0 / 0 the convergence rate)."""
    grads = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]], dtype=torch.float64)
    torch.manual_seed(0)
    wide = make(name, num_tasks=2, rotation_shape=3).aggregate(grads, torch.ones(2, dtype=torch.float64))
    torch.manual_seed(0)
    narrow = make(name, num_tasks=2, rotation_shape=3).aggregate(grads.float(), torch.ones(2))
    assert wide.dtype == torch.float64 and bool(torch.isfinite(wide).all())
    torch.testing.assert_close(wide.float(), narrow)
