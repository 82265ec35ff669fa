"""Bad input to MTLWrapper.backward: a clear error, and no state changed (a corrected retry works)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import LossError
from tests.helpers import batch, mse_losses, small_model


def fresh_step(named: bool = False) -> tuple[mtlzoo.MTLWrapper, list[torch.Tensor]]:
    mtl = mtlzoo.MTLWrapper(small_model(named=named), "rotograd", rotation_shape=4)
    x, targets = batch()
    return mtl, mse_losses(mtl(x), targets)


BAD_LOSSES = {
    "too few": (lambda losses: losses[:2], "Expected 3 losses"),
    "too many": (lambda losses: [*losses, losses[0]], "Expected 3 losses"),
    "non-scalar": (lambda losses: [losses[0].expand(4), *losses[1:]], r"scalar.*\.mean\(\)"),
    "nan": (lambda losses: [losses[0] * math.nan, *losses[1:]], "Non-finite losses: 0=nan"),
    "inf": (lambda losses: [losses[0], losses[1] * math.inf, losses[2]], "Non-finite losses: 1=inf"),
    "not a tensor": (lambda losses: [1.0, *losses[1:]], "scalar tensor. Found float"),
    "2-D tensor": (lambda losses: torch.stack(losses).unsqueeze(0), "1-D"),
    "string": (lambda losses: "loss", "list, tuple, dict"),
    "integer": (lambda losses: [torch.tensor(1), *losses[1:]], "floating-point"),
    "no grad": (lambda losses: [loss.detach() for loss in losses], "requires grad"),
    "dict for unnamed heads": (lambda losses: {"a": losses[0]}, "not named"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOSSES))
def test_bad_losses_raise_and_leave_the_step_intact(case: str) -> None:
    mtl, losses = fresh_step()
    before = {key: value.clone() for key, value in mtl.state_dict().items() if isinstance(value, torch.Tensor)}
    mutate, message = BAD_LOSSES[case]
    with pytest.raises(LossError, match=message):
        mtl.backward(mutate(losses))
    assert all(p.grad is None for p in mtl.parameters())
    assert mtl.strategy.step == 0
    after = mtl.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) or (value.isnan().all() and after[key].isnan().all()), key
    mtl.backward(losses)  # the corrected call of the same step still works
    assert all(p.grad is not None for p in mtl.model_parameters())
    mtl.step(torch.optim.SGD(mtl.parameters(), lr=0.1))
    assert mtl.strategy.step == 1


def test_named_losses_must_match_task_names() -> None:
    mtl, losses = fresh_step(named=True)
    with pytest.raises(LossError, match=r"Missing: \['task2'\]; unexpected: \['other'\]"):
        mtl.backward({"task0": losses[0], "task1": losses[1], "other": losses[2]})
    mtl.backward({"task2": losses[2], "task0": losses[0], "task1": losses[1]})


def test_tensor_of_losses_is_accepted() -> None:
    mtl, losses = fresh_step()
    mtl.backward(torch.stack(losses))
    assert all(p.grad is not None for p in mtl.model_parameters())


def test_bad_backbone_loss_is_refused() -> None:
    mtl, losses = fresh_step()
    with pytest.raises(LossError, match="backbone_loss"):
        mtl.backward(losses, backbone_loss=torch.ones(2, requires_grad=True))
    with pytest.raises(LossError, match="not finite"):
        mtl.backward(losses, backbone_loss=torch.tensor(math.inf, requires_grad=True))
    assert mtl.strategy.step == 0


def test_the_nan_of_an_empty_mask_points_to_none() -> None:
    """Issue 19, item 17: the usual masked loss over an empty mask is NaN; the error says to give None instead."""
    mtl = mtlzoo.MTLWrapper(small_model(), "ls")
    x, targets = batch()
    predictions = mtl(x)
    mask = torch.zeros(targets.shape[1], dtype=torch.bool)  # no labels for task 1 in this batch
    losses = mse_losses(predictions, targets)
    losses[1] = nn.functional.mse_loss(predictions[1][mask], targets[1][mask])
    with pytest.raises(LossError, match=r"empty mask.*give None"):
        mtl.backward(losses)
    assert all(p.grad is None for p in mtl.parameters())
