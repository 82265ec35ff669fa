"""ExcessMTL (He et al., ICML 2024): task weights raised by exponentiated gradient on estimated excess risks.

Reference: the authors' code (yifei-he/ExcessMTL's ``LibMTL/weighting/ExcessMTL.py``, the same as LibMTL's
``ExcessMTL``), reimplemented below on its own terms: loss weights starting at 1, a running sum of squared
gradients, the first call recording the baselines, later calls multiplying by exp(eta E / E^0) and renormalising
to sum K, the model learning from sum_k lambda_k L_k (``rep_grad``: the gradients on the representation summed over
the batch).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model


class AuthorsExcessMTL:
    """The authors' ``backward`` minus autograd: the loss weights from one step's K x n gradients."""

    def __init__(self, num_tasks: int, robust_step_size: float) -> None:
        self.loss_weight = torch.ones(num_tasks, dtype=torch.float64)
        self.grad_sum: torch.Tensor | None = None
        self.initial_w: torch.Tensor | None = None
        self.eta = robust_step_size

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        if self.grad_sum is None:
            self.grad_sum = torch.zeros_like(grads)
        w = torch.zeros(grads.shape[0], dtype=torch.float64)
        for i in range(grads.shape[0]):
            self.grad_sum[i] += grads[i] ** 2
            h_i = torch.sqrt(self.grad_sum[i] + 1e-7)
            w[i] = grads[i] * (1 / h_i) @ grads[i]
        if self.initial_w is None:
            self.initial_w = w
        else:
            w = w / self.initial_w
            self.loss_weight = self.loss_weight * torch.exp(w * self.eta)
            self.loss_weight = self.loss_weight / self.loss_weight.sum() * grads.shape[0]
        return self.loss_weight


def test_equals_the_authors_code_over_several_steps() -> None:
    """Six steps of drifting gradients (task 2's growing): the same weights to 1e-12 and updates J^T lambda."""
    generator = torch.Generator().manual_seed(0)
    strategy = mtlzoo.create("excess_mtl", num_tasks=3, robust_step_size=0.5)
    reference = AuthorsExcessMTL(3, 0.5)
    base = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    for step in range(6):
        grads = base * torch.tensor([[1.0], [1.0 + step], [0.7]], dtype=torch.float64)
        grads = grads + 0.2 * torch.randn(3, 40, generator=generator, dtype=torch.float64)
        update = strategy.aggregate(grads, torch.ones(3, dtype=grads.dtype))
        strategy.advance()
        expected = reference(grads)
        torch.testing.assert_close(strategy.weights, expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(update, expected @ grads, rtol=1e-12, atol=1e-12)
    assert float(strategy.weights[1]) > 1.5  # the drifting task gained


def test_on_the_representation_the_gradients_are_summed_over_the_batch() -> None:
    """The authors' rep_grad branch: per-sample gradients (K, batch, d) summed over the batch before the excess risks;
    the update applies the weights to the per-sample gradients."""
    generator = torch.Generator().manual_seed(1)
    strategy = mtlzoo.create("excess_mtl", num_tasks=2, target="representation", robust_step_size=1.0)
    reference = AuthorsExcessMTL(2, 1.0)
    for step in range(4):
        grads = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0 + step]).view(
            2, 1, 1)
        update = strategy.aggregate(grads, torch.ones(2, dtype=grads.dtype))
        strategy.advance()
        weights = reference(grads.sum(1))
        torch.testing.assert_close(update, torch.tensordot(weights, grads, dims=1), rtol=1e-12, atol=1e-12)
    assert tuple(strategy.squares.shape) == (2, 3)


def test_through_the_wrapper_the_model_learns_from_the_weighted_losses() -> None:
    """The authors back-propagate sum_k lambda_k L_k: after each of three SGD steps, every parameter's .grad (backbone
    and heads) equals that loss's gradient, with lambda from the reference fed the per-task backbone gradients."""
    torch.manual_seed(0)
    model = small_model()
    twin = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, "excess_mtl", robust_step_size=1.0)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    reference = AuthorsExcessMTL(3, 1.0)
    shared = list(twin.backbone.parameters())
    for step in range(3):
        x, targets = batch(seed=step)
        optimizer.zero_grad()
        mtl.backward(mse_losses(mtl(x), targets))
        losses = torch.stack(mse_losses(twin(x), targets))
        jacobian = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                                for loss in losses]).double()
        weights = reference(jacobian)
        twin_optimizer.zero_grad()
        (weights.float() * losses).sum().backward()
        for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)
        mtl.step(optimizer)
        twin_optimizer.step()


def test_an_absent_task_keeps_its_weight_and_the_present_keep_their_sum() -> None:
    """A step without task 1: its weight, squares and baseline unchanged; the others' weights move, their sum kept."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "excess_mtl", robust_step_size=5.0)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    for step in range(2):
        x, targets = batch(seed=step)
        optimizer.zero_grad()
        mtl.backward(mse_losses(mtl(x), targets))
        mtl.step(optimizer)
    before = {name: value.clone() for name, value in mtl.strategy.state_dict().items() if name != "_extra_state"}
    x, targets = batch(seed=9)
    losses: list = mse_losses(mtl(x), targets)
    losses[1] = None
    optimizer.zero_grad()
    mtl.backward(losses)
    mtl.step(optimizer)
    weights = mtl.strategy.weights
    assert float(weights[1]) == float(before["weights"][1])
    assert torch.equal(mtl.strategy.squares[1], before["squares"][1])
    assert float(weights[[0, 2]].sum()) == pytest.approx(float(before["weights"][[0, 2]].sum()), rel=1e-12)
    assert not torch.equal(weights[[0, 2]], before["weights"][[0, 2]])


def test_a_task_with_a_zero_first_gradient_records_its_baseline_later() -> None:
    """E^0 = 0 would divide by zero (the authors'): the task's baseline is its first non-zero excess risk, and its
    weight moves only after that, while the others' do."""
    strategy = mtlzoo.create("excess_mtl", num_tasks=2, robust_step_size=1.0)
    first = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    strategy.aggregate(first, torch.ones(2, dtype=first.dtype))
    strategy.advance()
    assert strategy.baselines.tolist()[1] == 0
    second = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    strategy.aggregate(second, torch.ones(2, dtype=first.dtype))
    strategy.advance()
    assert float(strategy.baselines[1]) > 0 and bool(torch.isfinite(strategy.weights).all())
    assert float(strategy.weights[0]) > 1  # only task 0 had a ratio (E / E^0 > 0): its weight rose
