"""Several independent batches in one step (issue 21), and what MoDo, SDMGrad and MoCo share.

Through ``MTLWrapper.backward(losses, more_batches=[...])`` each method's shared update equals its formula on the
batches' own Jacobians, formed here by autograd apart from the engine (one ``torch.autograd.grad`` per task and
batch) and combined by the formula written out in this file; given one batch a multi-batch method warns once
(``ReusedBatchWarning``) and still trains. Each method trains the contract tests' small regression on the targets
it supports, lowers every task's loss, and does not train as ``ls`` does. Worked examples and the references
(torchjd 0.18, the authors' code) are in test_modo.py, test_sdmgrad.py, test_moco.py and
test_multibatch_reference.py.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.engine import backward
from mtlzoo.errors import LossError, ReusedBatchWarning
from tests.helpers import batch, mse_losses, optimizer_for, small_model

METHODS = ["modo", "sdmgrad", "moco"]
MULTI = {"modo": 2, "sdmgrad": 3}
BOTH = [(name, target) for name in METHODS for target in mtlzoo.get_strategy(name).cls.supported_targets]


def project(values: np.ndarray) -> np.ndarray:
    """The simplex projection by bisection on θ in sum(max(v - θ, 0)) = 1 (not the sort the library uses)."""
    low, high = float(values.min()) - 1.0, float(values.max())
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if np.maximum(values - middle, 0).sum() > 1 else (low, middle)
    return np.maximum(values - (low + high) / 2, 0)


def jacobian(model: mtlzoo.HardSharing, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """K x n: each task's gradient on the backbone's parameters, one autograd call per task."""
    shared = list(model.backbone.parameters())
    losses = [((head(model.backbone(x)) - t) ** 2).mean() for head, t in zip(model.heads, targets)]
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared)]) for loss in losses])


def by_hand(name: str, jacobians: list[torch.Tensor]) -> torch.Tensor:
    """The first step of each method from uniform weights, written out from its docstring's formula (float64)."""
    rows = [j.double().numpy() for j in jacobians]
    size = rows[0].shape[0]
    start = np.full(size, 1 / size)
    if name == "modo":  # λ = Π(λ - γ (J1 J2^T λ + ρ λ)), d = (J1 + J2)^T λ / 2
        weights = project(start - 0.1 * (rows[0] @ rows[1].T @ start + 0.1 * start))
        return torch.from_numpy((rows[0] + rows[1]).T @ weights / 2)
    if name == "moco":  # Y = β J (Y_0 = 0), λ = Π(λ - γ (Y Y^T + ρ I) λ), d = Y^T λ
        tracked = 0.1 * rows[0]
        weights = project(start - 0.1 * (tracked @ tracked.T + 0.1 * np.eye(size)) @ start)
        return torch.from_numpy(tracked.T @ weights)
    zeta, xi, xi_prime = rows  # SDMGrad: A = J_ξ J_ξ'^T / s^2, 20 momentum steps, d = K J_ζ^T (w + λ/K) / (1 + λ)
    product = xi @ xi_prime.T
    product = product / np.mean(np.sqrt(np.maximum(np.diag(product), 0) + 1e-4)) ** 2
    weights, velocity = start, 0.0
    for _ in range(20):
        velocity = 0.5 * velocity + product @ (weights + 0.3 / size)
        weights = project(weights - 10 * velocity)
    return torch.from_numpy(zeta.T @ (size * (weights + 0.3 / size) / 1.3))


@pytest.mark.parametrize("name", METHODS)
def test_with_its_batches_the_update_is_the_formula_on_each_batchs_jacobian(name: str) -> None:
    """MoDo reads 2 batches, SDMGrad 3 (the first is the one the model learns from), MoCo 1. The backbone's .grad is
    the formula's d (to float32 rounding of the Jacobians); the heads learn from the first batch's plain losses."""
    torch.manual_seed(0)
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, name)
    data = [batch(seed=seed) for seed in range(MULTI.get(name, 1))]
    assert mtl.strategy.request.batches == len(data)
    losses = [mse_losses(mtl(x), targets) for x, targets in data]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all its batches given: nothing reused, nothing said
        mtl.backward(losses[0], more_batches=losses[1:])
    expected = by_hand(name, [jacobian(model, x, targets) for x, targets in data])
    grad = torch.cat([p.grad.flatten() for p in model.backbone.parameters()]).double()
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * float(expected.norm()))
    x, targets = data[0]
    head_losses = mse_losses([head(model.backbone(x).detach()) for head in model.heads], targets)
    for head, loss in zip(model.heads, head_losses):
        for param, expected_grad in zip(head.parameters(), torch.autograd.grad(loss, list(head.parameters()))):
            torch.testing.assert_close(param.grad, expected_grad)


@pytest.mark.parametrize("name", sorted(MULTI))
def test_given_one_batch_it_reuses_it_warns_once_and_trains(name: str) -> None:
    """One batch per step: the first batch stands in for the others (the same update as given it k times), one
    ReusedBatchWarning in 20 steps, and every task's loss goes down."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name)
    optimizer = optimizer_for(mtl)
    before = training_losses(mtl)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for step in range(20):
            x, targets = batch(size=32, seed=step % 5)
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
    reused = [w for w in said if issubclass(w.category, ReusedBatchWarning)]
    assert len(reused) == 1
    assert f"reads {MULTI[name]} independent batches per backward, 1 given" in str(reused[0].message)
    after = training_losses(mtl)
    assert bool((after < before).all()), f"{name}: {before.tolist()} -> {after.tolist()}"
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(seed=9)
    grads = []
    for reuse in (False, True):
        twin = mtlzoo.MTLWrapper(copy.deepcopy(model), name)
        if reuse:
            predictions = [twin(x) for _ in range(MULTI[name])]
            twin.backward(mse_losses(predictions[0], targets),
                          more_batches=[mse_losses(p, targets) for p in predictions[1:]])
        else:
            with pytest.warns(ReusedBatchWarning):
                twin.backward(mse_losses(twin(x), targets))
        grads.append(torch.cat([p.grad.flatten() for p in twin.backbone.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def training_losses(mtl: mtlzoo.MTLWrapper) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.stack(mse_losses(mtl(x), targets))
                            for x, targets in (batch(len(mtl), size=32, seed=seed) for seed in range(5))]).mean(0)


def train(name: str, steps: int, **options: object) -> tuple[mtlzoo.MTLWrapper, torch.Tensor]:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **options)
    optimizer = optimizer_for(mtl)
    before = training_losses(mtl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedBatchWarning)  # one batch per step: said in the test above
        for step in range(steps):
            x, targets = batch(size=32, seed=step % 5)
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
    return mtl, before


@pytest.mark.parametrize(("name", "target"), BOTH)
def test_trains_the_regression_on_its_targets_lowers_every_loss_and_not_as_ls(name: str, target: str) -> None:
    """30 Adam steps lower each task's loss. From the same start on the same batches the backbone ends away from where
    ls takes it by more than 0.1% of the way ls moved it: Adam hides a constant factor, so ls under another name
    (the mean, the sum) would end within rounding of ls (about 1e-6). MoDo's default γ moves its weights slowly on
    this problem (it ends about 1% away on the representation); each method's pull towards MGDA's weights, which ls
    never has, is in its own test file."""
    mtl, before = train(name, 30, target=target)
    assert mtl.strategy.request.where == target
    after = training_losses(mtl)
    assert bool((after < before).all()), f"{name} on {target}: {before.tolist()} -> {after.tolist()}"
    torch.manual_seed(0)
    start = flat(small_model())
    theirs = flat(train("ls", 30)[0])
    assert float((flat(mtl) - theirs).norm()) > 1e-3 * float((theirs - start).norm())
    mean = flat(train("ls", 30, weights=[1 / 3] * 3)[0])  # the check can fail: ls's mean ends within rounding
    assert float((mean - theirs).norm()) < 1e-5 * float((theirs - start).norm())


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.backbone.parameters()])


@pytest.mark.parametrize("name", METHODS)
def test_standalone_in_float32_and_float64(name: str) -> None:
    """aggregate(J, losses) on a K x n matrix (the other batches reused) returns (n,) in J's dtype; float32 and
    float64 agree to float32 rounding (the maths runs in float64 either way)."""
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(4, 50, generator=generator, dtype=torch.float64)
    matrix[1:] -= 0.5 * matrix[0]
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedBatchWarning)
        for dtype in (torch.float32, torch.float64):
            update = mtlzoo.create(name, num_tasks=4).aggregate(matrix.to(dtype), torch.ones(4, dtype=dtype))
            assert update.dtype == dtype and update.shape == (50,)
            results[dtype] = update
    torch.testing.assert_close(results[torch.float32].double(), results[torch.float64], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MULTI))
def test_the_representation_target_reads_one_batch(name: str) -> None:
    """Products across batches of dL/dz pair unrelated samples: on the representation a step reads one batch, and
    more is refused clearly."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, target="representation")
    assert mtl.strategy.request.batches == 1
    (xa, ta), (xb, tb) = batch(seed=1), batch(seed=2)
    losses_a, losses_b = mse_losses(mtl(xa), ta), mse_losses(mtl(xb), tb)
    with pytest.raises(mtlzoo.errors.BackwardOrderError, match="reads 1 independent batch"):
        mtl.backward(losses_a, more_batches=[losses_b])


@pytest.mark.parametrize("name", sorted(MULTI))
def test_a_task_absent_from_another_batch_is_a_clear_error(name: str) -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name)
    losses = [mse_losses(mtl(x), targets) for x, targets in (batch(seed=seed) for seed in range(MULTI[name]))]
    losses[1][2] = None
    with pytest.raises(LossError, match=r"tasks \[2\] are absent from another batch"):
        mtl.backward(losses[0], more_batches=losses[1:])
    assert all(p.grad is None for p in mtl.parameters())


def test_the_functional_face_takes_a_multi_batch_method_with_its_one_batch() -> None:
    """mtlzoo.engine.backward: the one batch stands in for MoDo's two (warned), and the update is the formula's."""
    torch.manual_seed(0)
    model = small_model()
    strategy = mtlzoo.create("modo", num_tasks=3)
    x, targets = batch()
    features = model.backbone(x)
    with pytest.warns(ReusedBatchWarning, match="MoDo reads 2"):
        backward(strategy, mse_losses([head(features) for head in model.heads], targets), features, model.backbone)
    expected = by_hand("modo", [jacobian(model, x, targets)] * 2)
    grad = torch.cat([p.grad.flatten() for p in model.backbone.parameters()]).double()
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6 * float(expected.norm()))


@pytest.mark.parametrize("name", METHODS)
def test_state_is_declared_and_a_skipped_step_keeps_it(name: str) -> None:
    """The running weights (and MoCo's tracked gradients) advance once per taken step and not at a skipped one."""
    strategy = mtlzoo.create(name, num_tasks=3)
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    fields = {"weights"} | ({"tracked"} if name == "moco" else set())
    assert set(strategy.state.fields) == fields
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedBatchWarning)
        strategy.aggregate(matrix, torch.ones(3, dtype=torch.float64))
        strategy.discard()
        torch.testing.assert_close(strategy.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
        strategy.aggregate(matrix, torch.ones(3, dtype=torch.float64))
        strategy.advance()
    assert not torch.equal(strategy.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(strategy.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_the_other_batches_are_weighted_by_the_steps_loss_weights() -> None:
    """compose(ls with weights (1, 2, 3), MoDo): the step's w holds for every batch, so the same batch given twice
    (two forwards) and given once (reused) give the same update; the formula on the rows of w_k L_k."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(seed=4)
    grads = []
    for twice in (False, True):
        strategy = mtlzoo.compose(weighting=mtlzoo.create("ls", num_tasks=3, weights=[1.0, 2.0, 3.0]),
                                  aggregator="modo")
        twin = mtlzoo.MTLWrapper(copy.deepcopy(model), strategy)
        first = mse_losses(twin(x), targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReusedBatchWarning)
            twin.backward(first, more_batches=[mse_losses(twin(x), targets)] if twice else [])
        grads.append(torch.cat([p.grad.flatten() for p in twin.backbone.parameters()]).double())
    torch.testing.assert_close(grads[1], grads[0])
    weighted = torch.tensor([[1.0], [2.0], [3.0]]) * jacobian(model, x, targets)
    expected = by_hand("modo", [weighted, weighted])
    torch.testing.assert_close(grads[1], expected, rtol=1e-4, atol=1e-6 * float(expected.norm()))


def test_a_request_reads_several_batches_only_for_their_gradients() -> None:
    """A losses-only step back-propagates the first batch's losses alone: other batches there would go unread."""
    assert str(mtlzoo.Request("parameters", "gradients", batches=3)) == "gradients on parameters x3 batches"
    with pytest.raises(ValueError, match="`batches` should be 1 with where='losses'"):
        mtlzoo.Request(batches=2)
