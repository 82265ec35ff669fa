"""``mixedscale``: three tasks on one 8x8 digit whose losses live on very different scales."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.harness.problems.base import Batch, Metric, Problem, shuffled_batches
from mtlzoo.harness.problems.multidigits import SIDE, check_test_fraction, digits_backbone, split_digits
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import check_int
from mtlzoo.wrapper import MTLWrapper

TASKS = ("digit", "large", "ink")
HALF_INK = 8.0
"""A pixel counts as inked above half of scikit-learn's 0-16 intensity scale."""


@dataclass(frozen=True)
class MixedScale(Problem):
    """One 8x8 digit, three tasks: its class, whether it is 5 or more, and how many pixels it inks.

    Source: built for mtlzoo from scikit-learn's 8x8 digits (Alpaydin & Kaynak's UCI optical
    digits). The ``ink`` target is a raw count (about 19 ± 3 pixels above half intensity), left
    unnormalised on purpose, so its MSE starts near 350 while the two cross-entropies start near
    2.3 and 0.7: the loss scales differ by more than two orders of magnitude.

    What it teaches: which methods cope with losses on different scales without the user
    normalising them. Methods invariant to a task's loss scale (MGDA's normalisations, Nash-MTL,
    IMTL, FAMO, UW's learned scales) should keep the classifiers learning; the plain sum lets the
    regression's gradient dominate the shared layers.

    Model: the small CNN of ``multidigits``, one linear head per task; Adam at 1e-3, batches of 64.

    Metrics: ``accuracy`` for ``digit`` and ``large`` (higher is better), ``rmse`` in pixels for ``ink``
    (lower is better). An epoch: one pass over the training images.

    Args:
        batch_size: Images per step.
        test_fraction: Share of the 1,797 images held out for the test metrics.
        data_seed: Seed of the split.
    """

    batch_size: int = 64
    test_fraction: float = 0.25
    data_seed: int = 0

    name: ClassVar[str] = "mixedscale"
    summary: ClassVar[str] = "digit class, digit >= 5 and an unnormalised ink count: losses 300x apart (scikit-learn)"
    source: ClassVar[str] = "built for mtlzoo from scikit-learn's 8x8 digits (UCI optical digits)"
    literature: ClassVar[str] = "no published results: a test of robustness to loss scales"
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("accuracy", higher_is_better=True, description="test accuracy"),
        Metric("rmse", higher_is_better=False, description="test root mean squared error, in pixels"),
    )
    requires: ClassVar[tuple[str, ...]] = ("sklearn",)
    extra: ClassVar[str | None] = "digits"
    in_default: ClassVar[bool] = False
    default_steps: ClassVar[int] = 400
    default_seeds: ClassVar[int] = 2
    full_steps: ClassVar[int] = 2_100
    """100 epochs of the 1,348 training images."""
    full_seeds: ClassVar[int] = 5

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size)
        check_test_fraction(self.test_fraction)

    @property
    def task_names(self) -> list[str]:
        return list(TASKS)

    @property
    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        return {"digit": ("accuracy",), "large": ("accuracy",), "ink": ("rmse",)}

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.data["x_train"]) // self.batch_size, 1)

    @cached_property
    def data(self) -> dict[str, Tensor]:
        """``x_*`` (n, 1, 8, 8) in [0, 1]; ``digit_*``, ``large_*`` (n,) long; ``ink_*`` (n,) float pixel counts."""
        raw, labels, splits, _ = split_digits(self, self.test_fraction, self.data_seed)
        data = {}
        for split, index in splits.items():
            data[f"x_{split}"] = (raw[index] / 16.0).unsqueeze(1)
            data[f"digit_{split}"] = labels[index]
            data[f"large_{split}"] = (labels[index] >= 5).long()
            data[f"ink_{split}"] = (raw[index] > HALF_INK).sum((1, 2)).float()
        return data

    def build_model(self) -> HardSharing:
        return HardSharing(digits_backbone(SIDE), [nn.Linear(64, 10), nn.Linear(64, 2), nn.Linear(64, 1)])

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        data = self.data
        for index in shuffled_batches(len(data["x_train"]), self.batch_size, generator):
            yield data["x_train"][index], tuple(data[f"{task}_train"][index] for task in TASKS)

    def losses(self, predictions: Any, targets: Any) -> list[Tensor]:
        digit, large, ink = predictions
        return [nn.functional.cross_entropy(digit, targets[0]), nn.functional.cross_entropy(large, targets[1]),
                nn.functional.mse_loss(ink.squeeze(-1), targets[2])]

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        data = self.data
        digit, large, ink = mtl(data["x_test"].to(device))
        return {
            "digit": {"accuracy": float((digit.argmax(-1).cpu() == data["digit_test"]).float().mean())},
            "large": {"accuracy": float((large.argmax(-1).cpu() == data["large_test"]).float().mean())},
            "ink": {"rmse": float((ink.squeeze(-1).cpu() - data["ink_test"]).pow(2).mean().sqrt())},
        }
