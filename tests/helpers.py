"""Small models and problems shared by the tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import mtlzoo

# Values for hyperparameters without a default, so that every registered strategy can be built.
REQUIRED_VALUES: dict[str, Any] = {"alpha": 1.5}


def required_kwargs(name: str) -> dict[str, Any]:
    entry = mtlzoo.get_strategy(name)
    missing = [p for p, d in entry.hyperparameters.items() if d is mtlzoo.strategy.REQUIRED]
    unknown = [p for p in missing if p not in REQUIRED_VALUES]
    assert not unknown, f"tests/helpers.py needs a value for the required hyperparameters {unknown} of {name!r}"
    return {p: REQUIRED_VALUES[p] for p in missing}


def small_model(num_tasks: int = 3, dim: int = 4, named: bool = False) -> mtlzoo.HardSharing:
    backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, dim))
    heads = [nn.Sequential(nn.Linear(dim, 6), nn.Tanh(), nn.Linear(6, 1)) for _ in range(num_tasks)]
    if named:
        return mtlzoo.HardSharing(backbone, {f"task{k}": head for k, head in enumerate(heads)})
    return mtlzoo.HardSharing(backbone, heads)


def batch(num_tasks: int = 3, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 5, generator=generator)
    targets = torch.randn(num_tasks, size, 1, generator=generator) * torch.arange(1, num_tasks + 1).view(-1, 1, 1)
    return x, targets


def mse_losses(predictions: Any, targets: torch.Tensor) -> list[torch.Tensor]:
    if isinstance(predictions, dict):
        predictions = list(predictions.values())
    return [((p - t) ** 2).mean() for p, t in zip(predictions, targets)]


def more_batches(mtl: mtlzoo.MTLWrapper, seed: int, size: int = 16, absent: int | None = None) -> list[list[Any]]:
    """The losses of the other independent batches of a step that the strategy's request reads (none for most),
    each from a forward of its own on data of its own seed; task ``absent`` left out as in the first batch."""
    found = []
    for index in range(1, mtl.strategy.request.batches):
        x, targets = batch(len(mtl), size=size, seed=1000 * index + seed)
        losses: list[Any] = mse_losses(mtl(x), targets)
        if absent is not None:
            losses[absent] = None
        found.append(losses)
    return found


def optimizer_for(mtl: mtlzoo.MTLWrapper) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [{"params": list(mtl.model_parameters())}]
    if strategy_parameters := mtl.strategy_parameters():
        groups.append({"params": strategy_parameters, "lr": 0.01})
    return torch.optim.Adam(groups, lr=0.01)


def train_steps(mtl: mtlzoo.MTLWrapper, optimizer: torch.optim.Optimizer, steps: int, first_seed: int = 0, *,
                backbone_loss: bool = False, epoch_every: int | None = None) -> None:
    """The documented loop: post-step losses for the strategies that read them, an epoch every few steps."""
    for step in range(steps):
        x, targets = batch(len(mtl), seed=first_seed + step)
        optimizer.zero_grad()
        with mtlzoo.cached():
            extra = 1e-3 * sum(p.pow(2).sum() for p in mtl.backbone.parameters()) if backbone_loss else None
            losses = mse_losses(mtl(x), targets)
            mtl.backward(losses, backbone_loss=extra, more_batches=more_batches(mtl, first_seed + step))
        mtl.step(optimizer, post_step_losses=lambda x=x, targets=targets: mse_losses(mtl(x), targets))
        if epoch_every and (step + 1) % epoch_every == 0:
            mtl.end_epoch()


def assert_same_state(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Two state dicts hold the same keys and bit-identical values (NaN equal to NaN)."""
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert actual[key] == value, key
