"""``toy2d``: the 2-D toy problem of the RotoGrad paper (Javaloy & Valera, ICLR 2022, Figure 1)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.harness.problems.base import Batch, Metric, Problem
from mtlzoo.registry import StrategyEntry
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import check_int
from mtlzoo.wrapper import MTLWrapper

SIGNS = (-1.0, 1.0)
OPTIMUM_VALUE = -6.0
OPTIMA = tuple((-1.5 * sign, -1.5 * sign) for sign in SIGNS)
"""Each task's optimum in the plane of its output: (1.5, 1.5) and (-1.5, -1.5)."""


def toy_values(z: Tensor, sign: float) -> Tensor:
    """``f(z; s)`` for each row of ``z`` (``sin(3u)/u`` written as ``3 sinc(3u/π)``, finite at 0)."""
    shifted = z + 1.5 * sign
    peaks = 3 * torch.sinc(3 * shifted / math.pi)
    return -peaks.sum(-1) + shifted.abs().sum(-1)


def toy_loss(z: Tensor, sign: float) -> Tensor:
    """``f(z; s)`` averaged over the batch."""
    return toy_values(z, sign).mean()


@dataclass(frozen=True)
class Toy2D(Problem):
    """The RotoGrad paper's 2-D toy: two tasks whose optima a single shared point cannot both reach.

    Two tasks read the same 2-D representation ``z`` through identity heads; task k's loss is
    ``f(z; s) = -(sin(3u)/u + sin(3v)/v) + |u| + |v|``, ``u = z_1 + 1.5 s``, ``v = z_2 + 1.5 s``,
    averaged over the batch, with ``s = -1`` (optimum at (1.5, 1.5)) and ``s = +1`` (at (-1.5, -1.5));
    both optima have the value -6. The backbone (Linear(2, 10), ReLU, Linear(10, 2)) sees a constant
    all-zero batch, so it moves one point ``z``, which cannot serve both optima; a rotation per task can.

    Source: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022,
    Figure 1, and the authors' ``example/`` folder (``toy.yml``: batch 256 of zeros, 400 steps,
    SGD at 1e-3 for the model, Adam at 0.05 for the rotations, ``normalize_losses: true``).

    What the literature says: with the losses summed (``ls``) the shared point falls into one
    task's basin, that task reaches its optimum (-6) and the other is left far from its own (a
    positive loss); RotoGrad's rotations let each task see the point at its own optimum, so both
    losses go down, to their optima on most seeds. Measured by the harness: on ``z`` the tasks'
    gradients conflict in most measurements under ``ls`` (they pull the one point towards opposite
    optima), and seldom once the rotations have aligned them (RotoGrad's "gradient homogenization").

    Metrics per task: the final ``loss`` and the ``distance`` of the task's output to its optimum.
    No Δm%: the dominant task's distance is near zero, so ratios against ``ls`` blow up. An epoch
    (for per-epoch methods such as DWA) is ``epoch_steps`` steps on the one fixed batch.

    Args:
        batch_size: Rows of the all-zero input batch.
        epoch_steps: Steps per epoch.
    """

    batch_size: int = 256
    epoch_steps: int = 10

    name: ClassVar[str] = "toy2d"
    summary: ClassVar[str] = "RotoGrad's 2-D toy: two tasks, opposite optima, one shared point"
    source: ClassVar[str] = "Javaloy & Valera, ICLR 2022, Figure 1 (https://arxiv.org/abs/2103.02631)"
    literature: ClassVar[str] = ("ls lets one task win (its loss -6) and leaves the other's loss positive; RotoGrad "
                                 "brings both tasks down, to their optima on most seeds")
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("loss", higher_is_better=False, description="the task's loss (its optimum is -6)"),
        Metric("distance", higher_is_better=False, description="distance of the task's output to its optimum"),
    )
    delta_m: ClassVar[bool] = False
    default_steps: ClassVar[int] = 400
    default_seeds: ClassVar[int] = 5
    full_steps: ClassVar[int] = 400
    full_seeds: ClassVar[int] = 5
    model_optimizer: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        for field in ("batch_size", "epoch_steps"):
            check_int(field, getattr(self, field))

    @property
    def num_tasks(self) -> int:
        return len(SIGNS)

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_steps

    def build_model(self) -> HardSharing:
        backbone = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 2))
        return HardSharing(backbone, [nn.Identity() for _ in SIGNS])

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        inputs = torch.zeros(self.batch_size, 2)
        for _ in range(self.epoch_steps):
            yield inputs, None

    def losses(self, predictions: Any, targets: Any) -> list[Tensor]:
        return [toy_loss(z, sign) for z, sign in zip(predictions, SIGNS)]

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        predictions = mtl(torch.zeros(self.batch_size, 2, device=device))
        return {name: {"loss": float(toy_loss(z, sign)),
                       "distance": float((z.mean(0) - torch.tensor(optimum, device=z.device)).norm())}
                for name, z, sign, optimum in zip(self.task_names, predictions, SIGNS, OPTIMA)}

    def trace(self, predictions: Any) -> list[list[float]]:
        """Each task's output (the batch mean of ``z_k``), for the trajectory plot."""
        return torch.stack([z.detach().float().mean(0) for z in predictions]).tolist()

    def strategy_options(self, entry: StrategyEntry) -> dict[str, Any]:
        options = super().strategy_options(entry)
        if "normalize_losses" in entry.hyperparameters:
            options["normalize_losses"] = True  # the authors' toy.yml
        return options

    def strategy_optimizer(self, entry: StrategyEntry) -> tuple[str, float] | None:
        if entry.info.adapts_representation:
            return "adam", 0.05  # the authors' toy.yml: algorithms.optimizer adam, learning_rate 0.05
        return None


RotoGradToy = Toy2D
"""The name this problem had before the problem registry."""
