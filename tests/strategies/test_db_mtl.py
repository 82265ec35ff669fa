"""DB-MTL (Lin et al., 2023): log losses, moving-average gradients rescaled to the largest one's norm.

Reference: LibMTL's ``DB_MTL`` (median-research-group/LibMTL, ``LibMTL/weighting/DB_MTL.py``, by the paper's
authors), reimplemented below on its own terms: the gradients of ``log(L_k + 1e-8)`` on the shared parameters, a
buffer ``g + beta / t^sigma (buffer - g)`` starting at 0, factors ``max ||buffer|| / (||buffer_k|| + 1e-8)``; every
head learns from its own log loss.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from mtlzoo.errors import NonPositiveLossError
from tests.helpers import batch, mse_losses, small_model


class AuthorsDBMTL:
    """LibMTL's ``DB_MTL.backward`` minus autograd: the shared update from one step's gradients of the log losses."""

    def __init__(self, beta: float, beta_sigma: float) -> None:
        self.beta, self.beta_sigma = beta, beta_sigma
        self.step = 0
        self.grad_buffer: torch.Tensor | None = None

    def __call__(self, batch_grads: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros_like(batch_grads)
        self.grad_buffer = batch_grads + (self.beta / self.step**self.beta_sigma) * (self.grad_buffer - batch_grads)
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        return sum(alpha[i] * self.grad_buffer[i] for i in range(len(alpha)))


def test_equals_libmtl_over_several_steps() -> None:
    """Six steps, beta = 0.9 and sigma = 0.5 (a decaying rate), losses from 0.01 to 100: the same update to 1e-12
    relative; the rows given are the raw losses' gradients, their log's are g_k / (L_k + 1e-8)."""
    generator = torch.Generator().manual_seed(0)
    strategy = mtlzoo.create("db_mtl", num_tasks=3, beta_sigma=0.5)
    reference = AuthorsDBMTL(beta=0.9, beta_sigma=0.5)
    for _ in range(6):
        grads = torch.randn(3, 25, generator=generator, dtype=torch.float64)
        losses = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64) * (1 + torch.rand(3, generator=generator,
                                                                                          dtype=torch.float64))
        update = strategy.aggregate(grads, losses)
        strategy.advance()
        expected = reference(grads / (losses + 1e-8).unsqueeze(1))
        torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12 * float(expected.norm()))
    assert strategy.aggregator.state.steps == 6


def test_through_the_wrapper_equals_libmtl_on_a_model() -> None:
    """Three SGD steps of a small model: the backbone's .grad is LibMTL's update from the per-task gradients of the log
    losses, every head's .grad the gradient of its own log loss."""
    torch.manual_seed(0)
    model = small_model()
    twin = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, "db_mtl")
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    reference = AuthorsDBMTL(beta=0.9, beta_sigma=0.0)
    shared = list(twin.backbone.parameters())
    for step in range(3):
        x, targets = batch(seed=step)
        optimizer.zero_grad()
        mtl.backward(mse_losses(mtl(x), targets))
        twin_optimizer.zero_grad()
        logs = torch.log(torch.stack(mse_losses(twin(x), targets)) + 1e-8)
        rows = []
        for log in logs:
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(log, shared, retain_graph=True)]))
        logs.sum().backward()  # the heads' gradients (each head reaches only its own log loss)
        update = reference(torch.stack(rows))
        for param, piece in zip(shared, update.split([p.numel() for p in shared])):
            param.grad = piece.view_as(param).clone()
        for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)
        mtl.step(optimizer)
        twin_optimizer.step()


def test_micro_batches_accumulate_the_update_of_their_summed_gradients() -> None:
    """Two micro-batches of a step: the averages take their summed gradient, and the two updates add up to the update
    of one step with that sum (the balanced averages, not the sum of two balanced ones); the next step agrees too."""
    generator = torch.Generator().manual_seed(1)
    split, whole = mtlzoo.create("db_mtl", num_tasks=3), mtlzoo.create("db_mtl", num_tasks=3)
    losses = torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        halves = torch.randn(2, 3, 10, generator=generator, dtype=torch.float64)
        accumulated = split.aggregate(halves[0], losses) + split.aggregate(halves[1], losses)
        split.advance()
        torch.testing.assert_close(accumulated, whole.aggregate(halves.sum(0), losses), rtol=1e-12, atol=1e-12)
        whole.advance()
        torch.testing.assert_close(split.aggregator.averages, whole.aggregator.averages, rtol=1e-12, atol=1e-14)


def test_a_loss_at_minus_eps_or_below_is_a_clear_error() -> None:
    """log(L + 1e-8) needs L > -1e-8: NonPositiveLossError naming the task; 0 is a valid loss."""
    strategy = mtlzoo.create("db_mtl", num_tasks=2)
    grads = torch.ones(2, 3, dtype=torch.float64)
    assert bool(torch.isfinite(strategy.aggregate(grads, torch.tensor([0.0, 1.0], dtype=torch.float64))).all())
    with pytest.raises(NonPositiveLossError, match="task 1"):
        strategy.aggregate(grads, torch.tensor([1.0, -1.0], dtype=torch.float64))
