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
