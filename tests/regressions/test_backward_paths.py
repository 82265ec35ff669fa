"""What a backward computes on each path (regressions from the new-user audit, issue 7): backbone extras
in the losses, a zero reference loss, a refused backward, huge gradients, the Gramian, losses by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import LossError, NonFiniteGradientError
from mtlzoo.roles import GramianWeightedSurgery
from mtlzoo.strategy import StrategyInfo
from tests.helpers import batch, mse_losses, small_model


class ExtrasBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(self.linear(x))
        return z, z.pow(2).mean()  # an auxiliary output attached to the backbone's graph


@pytest.mark.parametrize("strategy", ["ls", "rotate_only", "parameters"])
def test_item_4_backbone_extras_in_the_losses_reach_the_backbone(strategy: str) -> None:
    """Item 4: a loss that used the backbone's extras broke every gradient path (backward through the graph a
    second time); ls worked, RotoGrad did not. The gradients now equal plain summed-loss training."""
    from tests.test_step_protocol import SumSurgery

    torch.manual_seed(0)
    model = mtlzoo.HardSharing(ExtrasBackbone(), [nn.Linear(4, 1), nn.Linear(4, 1)])
    plain = copy.deepcopy(model)
    chosen = SumSurgery(2, target="parameters") if strategy == "parameters" else strategy
    kwargs = {"rotation_shape": 4, "rotation_init": "identity"} if strategy == "rotate_only" else {}
    mtl = mtlzoo.MTLWrapper(model, chosen, **kwargs)
    x, targets = batch(2)
    predictions, (aux,) = mtl(x)
    mtl.backward([((p - t) ** 2).mean() + 0.5 * aux for p, t in zip(predictions, targets)])
    z, plain_aux = plain.backbone(x)
    total = sum(((head(z) - t) ** 2).mean() + 0.5 * plain_aux for head, t in zip(plain.heads, targets))
    expected = torch.autograd.grad(total, list(plain.parameters()))
    for ours, theirs in zip(model.parameters(), expected):
        torch.testing.assert_close(ours.grad, theirs)


def test_item_7_a_zero_loss_at_the_reference_step_is_not_a_divisor() -> None:
    """Item 7: normalize_losses with a loss of exactly 0 at the reference step back-propagated NaN."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, normalize_losses=True)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.01)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    with pytest.warns(RuntimeWarning, match=r"tasks \[1\] were 0 at their reference step"):
        mtl.backward([losses[0], 0 * losses[1], losses[2]])
    assert all(torch.isfinite(p.grad).all() for p in mtl.parameters() if p.grad is not None)
    mtl.step(optimizer)
    assert math.isnan(mtl.strategy.initial_losses[1])
    optimizer.zero_grad()
    later = mse_losses(mtl(x), targets)
    mtl.backward(later)  # task 1 takes its reference at its first non-zero loss
    mtl.step(optimizer)
    torch.testing.assert_close(mtl.strategy.initial_losses[1], later[1].detach())


def test_item_8_a_refused_backward_leaves_the_wrapper_as_before() -> None:
    """Item 8: a LossError caught by the user left the next forward warning that a forward ran again."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    with pytest.raises(LossError):
        mtl.backward([losses[0] * math.nan, *losses[1:]])
    mtl.backward(mse_losses(mtl(x), targets))  # the next batch: no warning (warnings are errors here)
    assert all(p.grad is not None for p in mtl.model_parameters())


def test_item_14_huge_gradients_give_a_finite_step_or_a_clear_error() -> None:
    """Item 14: losses scaled by 1e30 gave RotoGrad a non-finite backbone gradient in silence."""
    x, targets = batch()
    ls = mtlzoo.MTLWrapper(small_model(), "ls")
    ls.backward([1e30 * loss for loss in mse_losses(ls(x), targets)])
    assert all(torch.isfinite(p.grad).all() for p in ls.parameters())
    mtl = mtlzoo.MTLWrapper(small_model(), "rotate_only", rotation_shape=4)
    with pytest.raises(NonFiniteGradientError, match="GradScaler"):
        mtl.backward([1e30 * loss for loss in mse_losses(mtl(x), targets)])
    assert all(p.grad is None for p in mtl.parameters())
    frozen = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
    frozen.strategy.requires_grad_(False)  # no rotation objective: the update itself must be finite
    frozen.backward([1e30 * loss for loss in mse_losses(frozen(x), targets)])
    assert all(torch.isfinite(p.grad).all() for p in frozen.model_parameters())


class DiagonalGramian(GramianWeightedSurgery):
    """Weights 1/sqrt(G_kk): the sum of the normalised task gradients, read from the Gramian alone."""

    info = StrategyInfo(name="test_diagonal", kind="surgery", summary="normalised sum", needs="parameter_jacobian")

    def gramian_weights(self, gramian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return gramian.diagonal().rsqrt()


@pytest.mark.parametrize("target", ["parameters", "representation"])
def test_item_24_the_gramian_is_the_gramian(target: str) -> None:
    """Item 24: replacing the Gramian by the identity survived the suite. Here the update is
    sum_k g_k / ||g_k||, computed by hand from per-task autograd gradients."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch()
    losses = mse_losses(model(x), targets)
    if target == "parameters":
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.backbone.parameters()),
                                                                    retain_graph=True)]) for loss in losses]
        expected = sum(row / row.norm() for row in rows)
    mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), DiagonalGramian(3, target=target))
    mtl.backward(mse_losses(mtl(x), targets))
    actual = torch.cat([p.grad.flatten() for p in mtl.backbone.parameters()])
    if target == "parameters":
        torch.testing.assert_close(actual, expected)
    else:
        z = model.backbone(x)
        grads = [torch.autograd.grad(((head(z) - t) ** 2).mean(), z, retain_graph=True)[0]
                 for head, t in zip(model.heads, targets)]
        dz = sum(g / g.norm() for g in grads)
        expected = torch.autograd.grad(z, list(model.backbone.parameters()), dz)
        torch.testing.assert_close(actual, torch.cat([g.flatten() for g in expected]))


@pytest.mark.parametrize("strategy", ["ls", "rotate_only"])
def test_item_24_named_losses_are_taken_by_name_not_by_dict_order(strategy: str) -> None:
    """Item 24: losses given as a dict in another order must be weighted as their task's, by name."""
    torch.manual_seed(0)
    model = small_model(named=True)
    plain = copy.deepcopy(model)
    weights = {"task0": 1.0, "task1": 5.0, "task2": 0.1}
    if strategy == "ls":
        mtl = mtlzoo.MTLWrapper(model, "ls", weights=list(weights.values()))
    else:  # a gradient path: normalize_losses weighs each loss by 1 / its own reference value
        mtl = mtlzoo.MTLWrapper(model, "rotate_only", rotation_shape=4, rotation_init="identity",
                                normalize_losses=True)
    x, targets = batch()
    out = mtl(x)
    losses = {name: ((out[name] - targets[k]) ** 2).mean() for k, name in enumerate(weights)}
    if strategy == "rotate_only":
        weights = {name: 1 / loss.item() for name, loss in losses.items()}
    mtl.backward(dict(reversed(list(losses.items()))))
    reference = plain(x)
    for k, name in enumerate(weights):
        loss = weights[name] * ((reference[name] - targets[k]) ** 2).mean()
        expected = torch.autograd.grad(loss, list(plain.heads[name].parameters()))
        for ours, theirs in zip(model.heads[name].parameters(), expected):
            torch.testing.assert_close(ours.grad, theirs)
