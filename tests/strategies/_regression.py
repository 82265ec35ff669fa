"""A small multitask regression for the loss-weighting tests.

Three tasks share structure (``f_k(x) = tanh(x (B + E_k)) v``: a common ``B``, a small task-specific
``E_k``) and differ in scale by orders of magnitude (``sigma = 1, 10, 100``, so the losses start
near 1, 1e2 and 1e4). Task 1 also carries label noise, so its loss has a floor that it reaches
early: it is the task whose loss falls slowest, relatively, which the rate-based methods (DWA,
FAMO, STCH, GradNorm) are built to notice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import mtlzoo

SCALES = (1.0, 10.0, 100.0)
NOISE = (0.0, 0.7, 0.0)
"""Label noise per task, relative to its scale: task 1's loss cannot go below about (0.7 sigma_1)^2."""
NUM_TASKS = len(SCALES)
INPUT, HIDDEN, WIDTH = 8, 32, 16
SLOW_TASK = 1


def data(size: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``x`` (size x 8) and the K targets (K x size x 1)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(INPUT, INPUT, generator=generator)
    specific = 0.3 * torch.randn(NUM_TASKS, INPUT, INPUT, generator=generator)
    readout = torch.randn(INPUT, 1, generator=generator) / INPUT ** 0.5
    x = torch.randn(size, INPUT, generator=generator)
    targets = torch.stack([
        scale * (torch.tanh(x @ (shared + specific[k]) / INPUT ** 0.5) @ readout
                 + noise * torch.randn(size, 1, generator=generator))
        for k, (scale, noise) in enumerate(zip(SCALES, NOISE))
    ])
    return x, targets


def model(seed: int = 0) -> mtlzoo.HardSharing:
    """A backbone whose last layer is linear (GradNorm's default layer), one small head per task."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(INPUT, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, WIDTH))
    heads = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 1)) for _ in range(NUM_TASKS)]
    return mtlzoo.HardSharing(backbone, heads)


def mse(predictions: list[Tensor], targets: Tensor) -> list[Tensor]:
    return [((p - t) ** 2).mean() for p, t in zip(predictions, targets)]


@dataclass
class Run:
    """What a training run leaves: the wrapper, each task's loss on the whole data before and after, and, at every
    step (one backward each), the batch losses and the loss weights the strategy gave them."""

    mtl: mtlzoo.MTLWrapper
    before: Tensor
    after: Tensor
    losses: list[Tensor] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)


def full_losses(mtl: mtlzoo.MTLWrapper, x: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.stack(mse(mtl(x), targets))


def train(strategy: str | mtlzoo.Strategy, *, epochs: int = 40, batches: int = 4, lr: float = 1e-2,
          strategy_lr: float = 0.2, seed: int = 0, on_epoch: Callable[[mtlzoo.MTLWrapper], None] | None = None,
          **kwargs: Any) -> Run:
    """Train on the regression with Adam, ``batches`` minibatches per epoch, ``mtl.end_epoch()`` after each and the
    post-step losses given (the documented loop); record the loss weights of every step."""
    x, targets = data()
    mtl = mtlzoo.MTLWrapper(model(seed), strategy, **kwargs)
    groups: list[dict[str, Any]] = [{"params": list(mtl.model_parameters())}]
    if own := mtl.strategy_parameters():
        groups.append({"params": own, "lr": strategy_lr})
    optimizer = torch.optim.Adam(groups, lr=lr)
    run = Run(mtl, full_losses(mtl, x, targets), torch.empty(0))
    chunks = list(zip(x.chunk(batches), targets.chunk(batches, dim=1)))
    for _ in range(epochs):
        for xb, yb in chunks:
            optimizer.zero_grad()
            losses = mse(mtl(xb), yb)
            mtl.backward(losses)
            run.losses.append(torch.stack([loss.detach() for loss in losses]))
            run.weights.append(mtl.last_step.loss_weights.clone())  # what the step used, as a user logs it
            mtl.step(optimizer, post_step_losses=lambda xb=xb, yb=yb: mse(mtl(xb), yb))
        mtl.end_epoch()
        if on_epoch is not None:
            on_epoch(mtl)
    run.after = full_losses(mtl, x, targets)
    return run


@functools.cache
def trained(name: str, **kwargs: Any) -> Run:
    """One run of the named strategy with these hyperparameters per test session (shared by the tests that read it)."""
    return train(name, **kwargs)
