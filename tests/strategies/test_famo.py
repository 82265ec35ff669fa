"""FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023): logits learned by an inner Adam from the post-step losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.famo import FAMO
from tests.helpers import batch, mse_losses, optimizer_for, small_model
from tests.strategies import _regression


def test_worked_example_by_hand() -> None:
    """Logits 0, L = (1, 4): z = (1/2, 1/2), c = (1/2 + 1/8)^-1 = 8/5, w = c z / L = (4/5, 1/5). After the step the
    losses are (1/2, 3): delta = (log 2, log 4/3), the softmax's J^T delta = z (delta - z . delta) = +-(log 2 -
    log 4/3) / 4, and Adam's first step moves each logit by lr against its gradient's sign: (-lr, +lr)."""
    famo = FAMO(2)
    torch.testing.assert_close(famo.weights(torch.tensor([1.0, 4.0])), torch.tensor([0.8, 0.2]))
    famo.advance()
    famo.post_step(torch.tensor([0.5, 3.0]))
    gradient = (math.log(2) - math.log(4 / 3)) / 4
    step = 0.025 * gradient / (gradient + 1e-8)
    torch.testing.assert_close(famo.logits, torch.tensor([-step, step]))
    torch.testing.assert_close(famo.adam_exp_avg, torch.tensor([0.1 * gradient, -0.1 * gradient]))


@pytest.mark.reference
@pytest.mark.parametrize("gamma", [1e-3, 1e-5])
def test_same_weights_and_logits_as_torchjd_famo(gamma: float) -> None:
    """Against torchjd 0.18's FAMO (adapted from the authors' code): on the same sequence of losses before and after
    twelve steps, the same weights (d of its scalarization / d L) and the same logits after each update."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    reference = scalarization.FAMO(3, weight_decay=gamma)
    famo = FAMO(3, gamma=gamma)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        before = (torch.rand(3, generator=generator) + 0.1) * torch.tensor([1.0, 10.0, 1000.0])
        after = before * (0.5 + torch.rand(3, generator=generator))
        leaf = before.clone().requires_grad_()
        (expected,) = torch.autograd.grad(reference(leaf), leaf)
        torch.testing.assert_close(famo.weights(before), expected)
        famo.advance()
        reference.update(after)
        famo.post_step(after)
        torch.testing.assert_close(famo.logits, reference._w.detach())


def test_the_logits_are_state_not_parameters() -> None:
    """The user's optimizer never sees them; the logits, the inner torch.optim.Adam's state (moments and step count of
    each logit) and the step's losses are in state_dict(), exactly: a FAMO loaded from it takes the same next step."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "famo")
    assert mtl.strategy_parameters() == [] and list(mtl.strategy.parameters()) == []
    famo = FAMO(3)
    for before, after in ((torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.9, 1.7, 2.9])),
                          (torch.tensor([0.8, 1.5, 2.0]), torch.tensor([0.7, 1.4, 2.1]))):
        famo.weights(before)
        famo.advance()
        famo.post_step(after)
    famo.weights(torch.tensor([0.6, 1.3, 2.2]))
    famo.advance()
    state = copy.deepcopy(famo.state_dict())
    assert set(state["_extra_state"]["state"]) == {"inner", "losses_before", "step_losses"}
    loaded = FAMO(3)
    loaded.load_state_dict(state)
    for strategy in (famo, loaded):
        strategy.post_step(torch.tensor([0.5, 1.2, 2.0]))
    for name in ("logits", "adam_exp_avg", "adam_exp_avg_sq"):  # bit for bit
        assert torch.equal(getattr(loaded, name), getattr(famo, name)), name
    assert float(loaded.state.inner["step"]) == 3 and loaded.state.losses_before is None


def test_the_inner_optimizer_is_torch_adam() -> None:
    """The logits' steps are torch.optim.Adam's (weight decay gamma) on z . delta through the softmax, taken here
    by hand with a torch.optim.Adam over the K-vector of logits (no task absent: one step count for all)."""
    famo = FAMO(3, lr=0.1, gamma=0.01)
    logits = torch.zeros(3, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.1, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (0.5 + torch.rand(3, generator=generator))
        famo.weights(before)
        famo.advance()
        famo.post_step(after)
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        reference.zero_grad()
        (torch.softmax(logits, 0) @ delta).backward()
        reference.step()
        torch.testing.assert_close(famo.logits, logits.detach())


def test_a_checkpoint_with_the_state_as_buffers_still_loads() -> None:
    """Checkpoints written while the state was buffers (logits, adam_*, losses_before) load into the declared state."""
    famo = FAMO(2)
    state = famo.state_dict()
    state.update(logits=torch.tensor([0.5, -0.5]), adam_exp_avg=torch.tensor([0.1, -0.1]),
                 adam_exp_avg_sq=torch.tensor([0.01, 0.02]), adam_steps=torch.tensor([4.0, 4.0]),
                 losses_before=torch.tensor([float("nan"), float("nan")]))
    loaded = FAMO(2)
    loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.logits, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(loaded.adam_exp_avg_sq, torch.tensor([0.01, 0.02]))
    assert float(loaded.state.inner["step"]) == 4
    torch.testing.assert_close(loaded.task_weights, torch.softmax(torch.tensor([0.5, -0.5]), 0))


def test_without_post_step_losses_it_warns_once_and_keeps_equal_logits() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "famo")
    optimizer = optimizer_for(mtl)
    with pytest.warns(RuntimeWarning, match="post_step_losses") as caught:
        for step in range(3):
            x, targets = batch(3, seed=step)
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
    assert len(caught) == 1
    assert torch.equal(mtl.strategy.logits, torch.zeros(3))


def test_the_step_loss_is_the_mean_of_its_micro_batches_and_an_absent_task_keeps_its_state() -> None:
    famo = FAMO(3)
    famo.weights(torch.tensor([2.0, 4.0]), torch.tensor([0, 2]))
    famo.weights(torch.tensor([4.0, 8.0]), torch.tensor([0, 2]))
    famo.advance()
    torch.testing.assert_close(torch.tensor(famo.state.losses_before), torch.tensor([3.0, math.nan, 6.0]),
                               equal_nan=True)
    famo.post_step(torch.tensor([1.0, math.nan, 5.0]))
    famo.weights(torch.tensor([2.0, 3.0]), torch.tensor([0, 1]))  # a second step: task 2 now absent
    famo.advance()
    famo.post_step(torch.tensor([1.5, 2.5, math.nan]))
    assert float(famo.logits[2]) != 0 and float(famo.adam_exp_avg[2]) != 0  # kept from the first step
    kept = famo.logits[2].clone(), famo.adam_exp_avg[2].clone()
    famo.weights(torch.tensor([2.0, 3.0]), torch.tensor([0, 1]))
    famo.advance()
    famo.post_step(torch.tensor([1.5, 2.5, math.nan]))
    assert torch.equal(famo.logits[2], kept[0]) and torch.equal(famo.adam_exp_avg[2], kept[1])
    famo = FAMO(3)
    famo.weights(torch.tensor([2.0, 4.0]), torch.tensor([0, 2]))
    famo.advance()
    famo.post_step(torch.tensor([1.0, math.nan, 5.0]))
    assert float(famo.logits[1]) == 0 and float(famo.adam_exp_avg[1]) == 0 and float(famo.adam_exp_avg_sq[1]) == 0
    assert float(famo.logits[0]) != 0 and float(famo.adam_exp_avg[0]) != 0


def test_on_the_regression_the_slowest_task_gets_the_largest_weight() -> None:
    """The paper's rule: a logit rises when its log-loss fell less than the weighted mean. Task 1 (label noise: its
    loss plateaus) ends with the largest z, task 0 (whose log-loss falls most) with the smallest."""
    run = _regression.trained("famo")
    z = run.mtl.strategy.task_weights
    drop = (run.before.log() - run.after.log())
    assert int(drop.argmax()) == 0 and int(drop.argmin()) != 0
    assert int(z.argmax()) == _regression.SLOW_TASK and int(z.argmin()) == 0
    assert float(z.max() - z.min()) > 0.1
