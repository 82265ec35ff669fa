"""STCH, smooth Tchebycheff scalarization (Lin et al., ICML 2024) with its authors' multitask recipe."""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from mtlzoo.strategies.stch import SmoothTchebycheff
from tests.strategies import _regression


def feed(stch: SmoothTchebycheff, steps: list[list[float]]) -> list[torch.Tensor]:
    weights = []
    for losses in steps:
        weights.append(stch.weights(torch.tensor(losses)))
        stch.advance()
    stch.end_epoch()
    return weights


def test_worked_example_by_hand() -> None:
    """warmup_epochs = 0: epoch 0 learns from sum log L (w = 1/L) and its losses (2, 4), (4, 8) average to the nadir
    n = (3, 6). Then L = (1.5, 12): l = log(L / n) = (log 1/2, log 2), total = 2 mu log(1/2 + 2) with mu = 1, and
    w = 2 softmax(l) / L = 2 (1/5, 4/5) / (1.5, 12)."""
    stch = SmoothTchebycheff(2, warmup_epochs=0)
    warm = feed(stch, [[2.0, 4.0], [4.0, 8.0]])
    torch.testing.assert_close(warm[0], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(stch.nadir, torch.tensor([3.0, 6.0]))
    losses = torch.tensor([1.5, 12.0])
    torch.testing.assert_close(stch.scalarize(losses), torch.tensor(2 * math.log(2.5)))
    torch.testing.assert_close(stch.weights(losses), torch.tensor([2 * 0.2 / 1.5, 2 * 0.8 / 12]))


def test_the_warm_up_schedule_is_the_authors() -> None:
    """warmup_epochs = 2: epochs 0 and 1 sum log-losses, epoch 2 too while averaging the nadir, epoch 3 is STCH."""
    stch = SmoothTchebycheff(2, warmup_epochs=2)
    feed(stch, [[1.0, 1.0]])
    feed(stch, [[5.0, 5.0]])
    assert stch.warming_up and not bool(torch.isfinite(stch.nadir).any())
    weights = feed(stch, [[2.0, 4.0], [2.0, 8.0]])
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.125]))
    torch.testing.assert_close(stch.nadir, torch.tensor([2.0, 6.0]))
    assert not stch.warming_up


@pytest.mark.reference
@pytest.mark.parametrize("mu", [1.0, 0.1])
def test_same_value_and_gradients_as_torchjd_stch_on_the_normalised_log_losses(mu: float) -> None:
    """Against torchjd 0.18's STCH, which is the scalarization alone: fed log(L / n) with unit preferences, K times its
    value is ours and so are its gradients in L. The authors' code subtracts the detached maximum without adding it
    back: another value, the same gradients (checked too)."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    stch = SmoothTchebycheff(3, mu=mu, warmup_epochs=0)
    feed(stch, [[1.0, 10.0, 1000.0]])
    reference = scalarization.STCH(mu, weights=torch.ones(3))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        losses = (torch.rand(3, generator=generator) + 0.1) * torch.tensor([1.0, 10.0, 1000.0])
        leaf = losses.clone().requires_grad_()
        value = 3 * reference(torch.log(leaf / stch.nadir))
        (gradient,) = torch.autograd.grad(value, leaf)
        torch.testing.assert_close(stch.scalarize(losses), value.detach())
        torch.testing.assert_close(stch.weights(losses), gradient)
        normalised = torch.log(leaf / stch.nadir + 1e-20)
        authors = mu * torch.log(torch.exp((normalised - normalised.max().detach()) / mu).sum()) * 3
        torch.testing.assert_close(stch.weights(losses), torch.autograd.grad(authors, leaf)[0])


def test_a_small_mu_weighs_the_task_furthest_above_its_nadir() -> None:
    """The paper's limit mu -> 0: the Tchebycheff maximum, so only the task with the largest L / n learns."""
    stch = SmoothTchebycheff(3, mu=1e-3, warmup_epochs=0)
    feed(stch, [[1.0, 1.0, 1.0]])
    weights = stch.weights(torch.tensor([0.5, 2.0, 0.9]))
    torch.testing.assert_close(weights * torch.tensor([0.5, 2.0, 0.9]), torch.tensor([0.0, 3.0, 0.0]))


def test_without_end_epoch_it_stays_in_its_warm_up_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SmoothTchebycheff, "reminder_steps", 3)
    stch = mtlzoo.create("stch", num_tasks=2, warmup_epochs=0)
    with pytest.warns(RuntimeWarning, match=r"end_epoch\(\)") as caught:
        for _ in range(6):
            torch.testing.assert_close(stch.weights(torch.tensor([2.0, 4.0])), torch.tensor([0.5, 0.25]))
            stch.advance()
    assert len(caught) == 1


def test_float64_losses_keep_a_float64_nadir_and_weights() -> None:
    """Issue 19, item 7: the nadir sums were float32 buffers (4e-6 off after 18 steps in the issue's run). Reference:
    w_k = K softmax(log(L / n) / mu)_k / L_k written out in float64, n the nadir epoch's float64 average."""
    stch = SmoothTchebycheff(2, mu=1e-3, warmup_epochs=0)
    nadir = torch.tensor([1.0 + 3e-9, 2.0 - 5e-9], dtype=torch.float64)
    stch.weights(nadir)
    stch.advance()
    stch.end_epoch()
    assert stch.nadir.dtype == torch.float64 and torch.equal(stch.nadir, nadir)
    stch.end_epoch()  # past the nadir epoch
    losses = torch.tensor([1.0 + 4e-9, 2.0 - 2e-9], dtype=torch.float64)
    expected = 2 * torch.softmax(torch.log(losses / nadir) / 1e-3, dim=0) / losses
    torch.testing.assert_close(stch.weights(losses), expected, rtol=1e-9, atol=0)


def test_on_the_regression_the_task_least_improved_since_the_nadir_gets_the_most_weight() -> None:
    """After the warm-up, w_k L_k = K softmax(log(L_k / n_k) / mu): task 1, whose loss plateaus near its nadir value
    while the others keep falling, gets the largest share, above the warm-up's 1."""
    run = _regression.trained("stch", warmup_epochs=1)
    shares = run.weights[-1] * run.losses[-1]
    torch.testing.assert_close(shares.sum(), torch.tensor(3.0))
    assert int(shares.argmax()) == _regression.SLOW_TASK and float(shares.max()) > 1.2
    warm = run.weights[0] * run.losses[0]
    torch.testing.assert_close(warm, torch.ones(3))
