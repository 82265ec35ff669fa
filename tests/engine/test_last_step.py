"""Issue 19, item 22: what a step used (the loss weights w and the gradient coefficients c), after mtl.backward."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model


def test_before_any_backward_there_is_nothing() -> None:
    assert mtlzoo.MTLWrapper(small_model(), "ls").last_step is None


@pytest.mark.parametrize("name", ["ls", "uw", "dwa"])
def test_a_weighting_reports_its_loss_weights_and_unit_coefficients(name: str) -> None:
    """Definition: the model's gradients are those of sum_k w_k L_k by plain autograd, with the reported w."""
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, name)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    used = mtl.last_step
    assert used is not None and used.coefficients is not None
    torch.testing.assert_close(used.coefficients, torch.ones(3))
    total = sum(w * loss for w, loss in zip(used.loss_weights, mse_losses(reference(x), targets)))
    total.backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad)


def test_a_gramian_surgery_reports_the_coefficients_the_shared_part_received() -> None:
    """Definition: the backbone's gradient is sum_k c_k dL_k/dθ (per-task plain autograd), with the reported c."""
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, "upgrad", target="parameters")
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    used = mtl.last_step
    assert used is not None and used.coefficients is not None
    torch.testing.assert_close(used.loss_weights, torch.ones(3))
    assert not torch.allclose(used.coefficients, torch.ones(3))  # the example has conflicting tasks
    losses = mse_losses(reference(x), targets)
    shared = list(reference.backbone.parameters())
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    for index, param in enumerate(model.backbone.parameters()):
        expected = sum(c * grads[index] for c, grads in zip(used.coefficients, per_task))
        torch.testing.assert_close(param.grad, expected)


def test_a_direction_has_no_coefficients() -> None:
    """GradDrop's update is a combined gradient built from masks, not coefficients of the task gradients."""
    mtl = mtlzoo.MTLWrapper(small_model(), "graddrop")
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    assert mtl.last_step is not None and mtl.last_step.coefficients is None


def test_an_absent_task_reads_nan() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "upgrad")
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward([losses[0], None, losses[2]])
    used = mtl.last_step
    assert used is not None and used.coefficients is not None
    assert math.isnan(used.loss_weights[1]) and math.isnan(used.coefficients[1])
    assert used.tasks.tolist() == [0, 2] and not used.coefficients[[0, 2]].isnan().any()
