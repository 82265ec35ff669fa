"""The example third-party package under plugins/, installed with its entry point (README test command)."""

from __future__ import annotations

import importlib.metadata

import torch

import mtlzoo
from tests.helpers import batch, mse_losses, small_model


def test_installed_plugin_is_listed_created_and_trained() -> None:
    version = importlib.metadata.version("mtlzoo-example")  # fails if the package is not installed
    entry = mtlzoo.get_strategy("mean_loss")
    assert str(entry.origin) == f"mtlzoo-example {version}"
    assert mtlzoo.get_strategy("example-mean") is entry
    assert "mean_loss" in [e.name for e in mtlzoo.list_strategies(kind="weighting")]

    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, "mean_loss")
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses)
    expected = torch.autograd.grad(sum(mse_losses(model(x), targets)) / 3, list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_the_stateful_example_follows_its_recurrence_once_per_optimizer_step() -> None:
    """Reference: RunningScale's recurrence by hand, m <- beta m + (1 - beta) L from each step's first micro-batch
    (the first step starts m at the first losses); two micro-batches per step, the second one's losses ignored."""
    strategy = mtlzoo.create("running_scale", num_tasks=2, beta=0.5)
    steps = [([2.0, 4.0], [9.0, 9.0]), ([4.0, 2.0], [1.0, 1.0]), ([1.0, 1.0], [5.0, 5.0])]
    expected_scales = None
    for first, second in steps:
        for losses in (first, second):
            weights = strategy.weights(torch.tensor(losses))
            scales = torch.tensor(first) if expected_scales is None else expected_scales
            torch.testing.assert_close(weights, 1 / scales)
            strategy.micro_batch += 1
        strategy.advance()
        first_losses = torch.tensor(first)
        expected_scales = first_losses if expected_scales is None else 0.5 * expected_scales + 0.5 * first_losses
        torch.testing.assert_close(strategy.scales, expected_scales)
    assert strategy.state.steps == 3 and strategy.state_dict()["_extra_state"]["state"]["steps"] == 3


def test_the_gramian_example_rescales_every_gradient_to_the_mean_norm() -> None:
    """Reference: a worked example. Norms 3 and 1 (mean 2): weights 2/3 and 2, so the rows become (2, 0) and (0, 2);
    a zero row gets weight 0."""
    strategy = mtlzoo.create("equal_norm", num_tasks=3)
    grads = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(strategy.aggregate(grads[:2], torch.ones(2)), torch.tensor([2.0, 2.0]))
    mean = 4.0 / 3.0
    torch.testing.assert_close(strategy.aggregate(grads, torch.ones(3)), torch.tensor([mean, mean]))
