r"""The 2-D toy problem of the RotoGrad paper (Javaloy & Valera, ICLR 2022, Figure 1).

Two tasks read the same 2-D representation ``z`` through identity heads. Task k's loss is

``f(z; s) = -(sin(3u)/u + sin(3v)/v) + |u| + |v|``,  ``u = z_1 + 1.5 s``,  ``v = z_2 + 1.5 s``,

averaged over the batch, with ``s = -1`` for the first task (optimum at (1.5, 1.5)) and
``s = +1`` for the second (optimum at (-1.5, -1.5)); both optima have the value -6. The backbone
(Linear(2, 10), ReLU, Linear(10, 2)) sees a constant all-zero batch of 256, so it can only move
one point ``z``: a single shared point cannot serve both optima, but a rotation per task can.
Training: 400 steps of SGD at 1e-3 for the model, Adam at 0.05 for the strategy's parameters, and
``normalize_losses=True`` for strategies that have it, as in the authors' example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.caching import cached
from mtlzoo.registry import get_strategy
from mtlzoo.wrapper import HardSharing, MTLWrapper

SIGNS = (-1.0, 1.0)
OPTIMUM_VALUE = -6.0


def toy_loss(z: Tensor, sign: float) -> Tensor:
    """``f(z; s)`` averaged over the batch (``sin(3u)/u`` written as ``3 sinc(3u/π)``, finite at 0)."""
    shifted = z + 1.5 * sign
    peaks = 3 * torch.sinc(3 * shifted / math.pi)
    return (-peaks.sum(-1) + shifted.abs().sum(-1)).mean()


@dataclass(frozen=True)
class RotoGradToy:
    """The problem's settings; :meth:`train` runs one strategy on it and returns the final losses."""

    steps: int = 400
    batch_size: int = 256
    model_lr: float = 1e-3
    strategy_lr: float = 0.05

    def build_model(self) -> HardSharing:
        backbone = nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 2))
        return HardSharing(backbone, [nn.Identity() for _ in SIGNS])

    def losses(self, predictions: list[Tensor]) -> list[Tensor]:
        return [toy_loss(z, sign) for z, sign in zip(predictions, SIGNS)]

    def train(self, strategy: str, seed: int = 0, **strategy_kwargs: Any) -> list[float]:
        """Train from seed ``seed`` with the named strategy; the K task losses after training.

        The global RNG state is restored afterwards.
        """
        if "normalize_losses" in get_strategy(strategy).hyperparameters:
            strategy_kwargs.setdefault("normalize_losses", True)
        inputs = torch.zeros(self.batch_size, 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mtl = MTLWrapper(self.build_model(), strategy, **strategy_kwargs)
            with torch.no_grad():
                mtl(inputs)  # materialises lazily shaped strategies before the optimizers are built
            optimizers = [torch.optim.SGD(mtl.model_parameters(), lr=self.model_lr)]
            if strategy_parameters := mtl.strategy_parameters():
                optimizers.append(torch.optim.Adam(strategy_parameters, lr=self.strategy_lr))
            for _ in range(self.steps):
                mtl.zero_grad()
                with cached():
                    mtl.backward(self.losses(mtl(inputs)))
                mtl.step(*optimizers)
            mtl.eval()
            with torch.no_grad():
                return [float(loss) for loss in self.losses(mtl(inputs))]
