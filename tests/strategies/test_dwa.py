"""DWA, dynamic weight average (Liu, Johns & Davison, CVPR 2019), on the protocol's epoch hook."""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.dwa import DynamicWeightAverage
from tests.strategies import _regression


def run_epochs(dwa: mtlzoo.Strategy, epochs: list[list[list[float]]]) -> list[torch.Tensor]:
    """Feed each epoch's steps (one backward each), end each epoch; the weights given at every step."""
    weights = []
    for steps in epochs:
        for losses in steps:
            weights.append(dwa.weights(torch.tensor(losses)))
            dwa.advance()
        dwa.end_epoch()
    return weights


def test_worked_example_by_hand() -> None:
    """Epoch averages (2, 2) then (1, 2): rates r = (1/2, 1), w = 2 exp(r/2) / sum exp(r/2) in the third epoch;
    all ones during the first two (the paper's initialisation)."""
    dwa = mtlzoo.create("dwa", num_tasks=2)
    weights = run_epochs(dwa, [[[1.0, 2.0], [3.0, 2.0]], [[1.0, 1.8], [1.0, 2.2]], [[0.5, 2.0]]])
    for w in weights[:4]:
        torch.testing.assert_close(w, torch.ones(2))
    a, b = math.exp(0.25), math.exp(0.5)
    torch.testing.assert_close(weights[4], torch.tensor([2 * a / (a + b), 2 * b / (a + b)]))


@pytest.mark.reference
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_same_weights_as_torchjd_dwa(temperature: float) -> None:
    """Against torchjd 0.18's DWA (epoch averages over its calls, step() at the end of each epoch): the same
    weights at every step of six epochs of random losses spanning three orders of magnitude."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    reference = scalarization.DWA(temperature=temperature)
    dwa = mtlzoo.create("dwa", num_tasks=3, temperature=temperature)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for _ in range(4):
            losses = (torch.rand(3, generator=generator) + 0.1) * torch.tensor([1.0, 10.0, 1000.0])
            leaf = losses.clone().requires_grad_()
            (expected,) = torch.autograd.grad(reference(leaf), leaf)
            torch.testing.assert_close(dwa.weights(losses), expected)
            dwa.advance()
        reference.step()
        dwa.end_epoch()


def test_micro_batches_count_in_the_average_and_a_skipped_step_does_not() -> None:
    """Each backward of a taken step joins the epoch's average; a discarded step (GradScaler skip) leaves nothing."""
    dwa = DynamicWeightAverage(2)
    dwa.weights(torch.tensor([1.0, 1.0]))
    dwa.discard()
    dwa.weights(torch.tensor([2.0, 4.0]))
    dwa.weights(torch.tensor([4.0, 8.0]))  # a second micro-batch of the same step
    dwa.advance()
    dwa.end_epoch()
    torch.testing.assert_close(dwa.averages[1], torch.tensor([3.0, 6.0]))


def test_without_end_epoch_it_keeps_equal_weights_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DynamicWeightAverage, "reminder_steps", 3)
    dwa = DynamicWeightAverage(2)
    with pytest.warns(RuntimeWarning, match=r"end_epoch\(\)") as caught:
        for step in range(8):
            torch.testing.assert_close(dwa.weights(torch.tensor([1.0, 2.0]) / (step + 1)), torch.ones(2))
            dwa.advance()
    assert len(caught) == 1


def test_float64_losses_keep_float64_sums_and_weights() -> None:
    """Issue 19, item 7: the epoch sums were float32 buffers, so float64 losses lost their precision (the rates
    differ by ~1e-9 here, below float32's resolution: the weights came out exactly 1). Reference: the paper's rule
    in float64 on the epoch averages."""
    dwa = DynamicWeightAverage(2, temperature=1e-6)
    epochs = [torch.tensor([1.0, 1.0], dtype=torch.float64),
              torch.tensor([1.0 + 1e-9, 1.0 - 1e-9], dtype=torch.float64)]
    for losses in epochs:
        dwa.weights(losses)
        dwa.advance()
        dwa.end_epoch()
    rates = epochs[1] / epochs[0]
    expected = 2 * torch.softmax(rates / 1e-6, dim=0)
    weights = dwa.weights(torch.ones(2, dtype=torch.float64))
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert float(weights[0] - weights[1]) > 1e-3


def test_on_the_regression_the_slowest_falling_task_gets_the_most_weight() -> None:
    """The paper's rule, from the run's own record: in every epoch from the third on, the weights are
    3 softmax(r / 2) of the ratios of the two previous epochs' average batch losses (computed here from the losses
    the strategy saw), so the task whose loss fell slowest gets the largest weight; ones before."""
    run = _regression.trained("dwa")
    losses, weights = torch.stack(run.losses), torch.stack(run.weights)
    steps = 4
    averages = losses.view(-1, steps, 3).mean(1)
    torch.testing.assert_close(weights[:2 * steps], torch.ones(2 * steps, 3))
    for epoch in range(2, averages.shape[0]):
        rates = averages[epoch - 1] / averages[epoch - 2]
        expected = 3 * torch.softmax(rates / 2, dim=0)
        for step in range(epoch * steps, (epoch + 1) * steps):
            torch.testing.assert_close(weights[step], expected)
        assert int(weights[epoch * steps].argmax()) == int(rates.argmax())
    assert float((weights - 1).abs().max()) > 0.05
