"""RotoGrad's rotations under another aggregator: ``mtlzoo.compose(adapter=Rotations(...), aggregator="upgrad")``.

The adapter rotates ``z`` per task and learns from the task gradients on ``z`` exactly as under
``rotate_only``; the aggregator combines those gradients ``g_k = dL_k/dz`` (taken through the
rotations, ``g_k = R_k^T dL_k/dz_k``) into the backbone's update.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from mtlzoo.errors import InvalidStrategyError
from mtlzoo.protocol import StepInputs
from mtlzoo.roles import Composite
from mtlzoo.strategies.rotations import Rotations
from tests.helpers import batch, mse_losses, small_model

K = 3


def rotations_under_upgrad(**options: object) -> Composite:
    return mtlzoo.compose(adapter=Rotations(K, rotation_shape=4, **options), aggregator="upgrad")  # type: ignore


def test_the_composite_reads_gradients_on_z_and_plays_both_roles() -> None:
    strategy = rotations_under_upgrad()
    assert strategy.present_roles() == ("aggregator", "adapter") and strategy.kind == "surgery"
    assert strategy.aggregator.target == "representation"  # a named aggregator next to an adapter
    assert str(strategy.request) == "gradients on representation"
    by_name = mtlzoo.compose(adapter="rotate_only", aggregator="upgrad", num_tasks=K)
    assert isinstance(by_name.adapter, Rotations)  # rotate_only stands for its adapter, the rotations
    with pytest.raises(InvalidStrategyError, match="adapter role"):
        mtlzoo.compose(adapter="rotograd", aggregator="upgrad", num_tasks=K)  # two roles: not one adapter


def test_the_shared_update_is_upgrads_combination_of_the_gradients_through_the_rotations() -> None:
    torch.manual_seed(0)
    model = small_model()
    strategy = rotations_under_upgrad()
    mtl = mtlzoo.MTLWrapper(model, strategy)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))

    z = model.backbone(x)
    leaf = z.detach().requires_grad_()
    losses = [((head(strategy.adapter.adapt(leaf, k)) - targets[k]) ** 2).mean() for k, head in enumerate(model.heads)]
    rows = torch.stack([torch.autograd.grad(loss, leaf)[0] for loss in losses])  # g_k = R_k^T dL_k/dz_k
    expected_dz = mtlzoo.create("upgrad", num_tasks=K).aggregate(rows.flatten(1).double(), torch.stack(losses).double())
    expected = torch.autograd.grad(z, list(model.backbone.parameters()), expected_dz.view_as(z).float())
    for param, grad in zip(model.backbone.parameters(), expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(rows.sum(0), expected_dz.view_as(z).float(), atol=1e-3)  # not the plain sum


def test_the_rotations_learn_as_under_rotate_only() -> None:
    """The rotation objective depends on the gradients on z alone: the same tangent gradients as rotate_only."""
    grads = []
    for strategy in (lambda: rotations_under_upgrad(), lambda: mtlzoo.create("rotate_only", num_tasks=K,
                                                                               rotation_shape=4)):
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(small_model(), strategy())
        x, targets = batch()
        mtl.backward(mse_losses(mtl(x), targets))
        grads.append([p.grad.clone() for p in mtl.strategy_parameters()])
    assert len(grads[0]) == K and all(bool(g.abs().max() > 0) for g in grads[0])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def train(mtl: mtlzoo.MTLWrapper, optimizer: torch.optim.Optimizer, steps: int, accumulate: int = 1) -> list[float]:
    totals = []
    for step in range(steps):
        optimizer.zero_grad()
        for part in range(accumulate):
            x, targets = batch(seed=step * accumulate + part)
            losses = mse_losses(mtl(x), targets)
            mtl.backward(losses)
            totals.append(float(sum(loss.detach() for loss in losses)))
        mtl.step(optimizer)
    return totals


def test_it_trains_through_the_wrapper_and_the_rotations_move() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), rotations_under_upgrad())
    before = mtl.strategy.adapter.rotations.clone()
    optimizer = torch.optim.Adam(mtl.parameters(), lr=0.01)
    x, targets = batch()
    totals = []
    for _ in range(40):
        optimizer.zero_grad()
        losses = mse_losses(mtl(x), targets)
        mtl.backward(losses)
        mtl.step(optimizer)
        totals.append(float(sum(losses).detach()))
    assert totals[-1] < 0.7 * totals[0] and all(b < a for a, b in zip(totals[:-10], totals[10:]))
    after = mtl.strategy.adapter.rotations
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after.mT @ after, torch.eye(4).expand(K, 4, 4), atol=1e-5, rtol=0)
    assert mtl.strategy.adapter.state.step == 40


def test_accumulation_and_a_checkpoint_resume_bit_for_bit() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), rotations_under_upgrad())
    optimizer = torch.optim.Adam(mtl.parameters(), lr=0.01)
    train(mtl, optimizer, steps=2, accumulate=2)
    saved = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    expected = train(mtl, optimizer, steps=2, accumulate=2)

    torch.manual_seed(1)
    resumed = mtlzoo.MTLWrapper(small_model(), rotations_under_upgrad())
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    assert train(resumed, resumed_optimizer, steps=2, accumulate=2) == expected
    for key, value in mtl.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, resumed.state_dict()[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_the_rotations_loss_normalisation_multiplies_a_weightings_weights() -> None:
    strategy = mtlzoo.compose(weighting="imtl_l", adapter=Rotations(2, rotation_shape=3, normalize_losses=True))
    with torch.no_grad():
        strategy.weighting.log_scales.copy_(torch.tensor([0.0, 1.0]))
    weights = strategy.loss_weights(StepInputs(torch.tensor([2.0, 4.0]), torch.arange(2), 2))
    torch.testing.assert_close(weights, torch.exp(torch.tensor([0.0, 1.0])) / torch.tensor([2.0, 4.0]))
