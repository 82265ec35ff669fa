"""``multidigits``: a MultiMNIST-style problem built from the 8x8 digits that scikit-learn ships (``digits`` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.harness.problems.base import InMemoryProblem, Metric, Problem
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import check_int
from mtlzoo.wrapper import MTLWrapper

SIDE = 8
TASKS = ("left", "right")


def digits_backbone(width: int) -> nn.Sequential:
    """The digits problems' small CNN on 8 x ``width`` images, to 64 features."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (SIDE // 2) * (width // 2), 64), nn.ReLU(),
    )


def split_digits(problem: Problem, test_fraction: float,
                 data_seed: int) -> tuple[Tensor, Tensor, dict[str, Tensor], torch.Generator]:
    """scikit-learn's 8x8 digits (intensities 0-16), their labels, the indices of the ``train`` and ``test`` images
    drawn from ``data_seed``, and the generator after that draw."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(problem.missing_message()) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)
    generator = torch.Generator().manual_seed(data_seed)
    order = torch.randperm(len(images), generator=generator)
    cut = round(len(images) * (1 - test_fraction))
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels, {"train": order[:cut], "test": order[cut:]}, generator


def check_test_fraction(value: float) -> None:
    if not 0 < value < 1:
        raise ValueError(f"Parameter `test_fraction` should be in (0, 1). Found `test_fraction = {value!r}`.")


@dataclass(frozen=True)
class MultiDigits(InMemoryProblem):
    """Two overlapping 8x8 digits side by side (the right one shifted by ``shift`` columns, the pixel-wise
    maximum where they overlap); one classification task per digit.

    Source: the MultiMNIST construction of Sabour, Frosst & Hinton (*Dynamic Routing Between
    Capsules*, NeurIPS 2017), as Sener & Koltun (*Multi-Task Learning as Multi-Objective
    Optimization*, NeurIPS 2018) use it for multitask learning (a left and a right digit, one
    task each), rebuilt from scikit-learn's 8x8 digits (Alpaydin & Kaynak's UCI optical digits,
    ``sklearn.datasets.load_digits``) so that it needs no download. Test pairs use held-out images.

    What the literature says: on MultiMNIST the two tasks are of equal difficulty and mostly
    cooperate; methods differ by a point or two of accuracy, equal weighting is a strong baseline
    and gradient-surgery methods (MGDA-UB, PCGrad, CAGrad) match or slightly beat it. Expect small
    differences here too, within the seed-to-seed spread at the default scale.

    Model: a small CNN (two 3x3 convolutions, 16 and 32 channels, max pooling, a linear layer to a
    64-dimensional representation) and a linear classifier per digit; Adam at 1e-3, batches of 128.

    Metrics per task: test ``accuracy`` (Δm% against ``ls`` reads it). An epoch: one pass over the
    training pairs.

    Args:
        shift: Columns by which the right digit is shifted (8 puts the digits apart, 4 overlaps them by half).
        train_size: Training pairs.
        test_size: Test pairs.
        batch_size: Pairs per step.
        test_fraction: Share of the 1,797 digit images kept for the test pairs.
        data_seed: Seed of the image split and of the pairing.
    """

    shift: int = 4
    train_size: int = 10_000
    test_size: int = 2_000
    batch_size: int = 128
    test_fraction: float = 0.25
    data_seed: int = 0

    name: ClassVar[str] = "multidigits"
    summary: ClassVar[str] = "MultiMNIST-style: two overlapping 8x8 digits, one classifier each (scikit-learn)"
    source: ClassVar[str] = "MultiMNIST (Sabour et al., NeurIPS 2017; Sener & Koltun, NeurIPS 2018) on sklearn digits"
    literature: ClassVar[str] = "cooperative tasks: equal weighting is strong, methods differ by about a point"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric("accuracy", higher_is_better=True, description="test accuracy"),)
    requires: ClassVar[tuple[str, ...]] = ("sklearn",)
    extra: ClassVar[str | None] = "digits"
    default_steps: ClassVar[int] = 400
    default_seeds: ClassVar[int] = 2
    full_steps: ClassVar[int] = 7_800
    """100 epochs, as Sener & Koltun train on MultiMNIST."""
    full_seeds: ClassVar[int] = 5

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or not 0 <= self.shift <= SIDE:
            raise ValueError(f"Parameter `shift` should be an int in [0, {SIDE}]. Found `shift = {self.shift!r}`.")
        for field in ("train_size", "test_size", "batch_size"):
            check_int(field, getattr(self, field))
        check_test_fraction(self.test_fraction)

    @property
    def task_names(self) -> list[str]:
        return list(TASKS)

    @cached_property
    def data(self) -> dict[str, Tensor]:
        """``x_train`` (n, 1, 8, 8 + shift) in [0, 1], ``y_train`` (2, n) and the same for the test pairs."""
        raw, labels, splits, generator = split_digits(self, self.test_fraction, self.data_seed)
        images = raw / 16.0
        data = {}
        for split, size in (("train", self.train_size), ("test", self.test_size)):
            pool = splits[split]
            left = pool[torch.randint(len(pool), (size,), generator=generator)]
            right = pool[torch.randint(len(pool), (size,), generator=generator)]
            canvas = torch.zeros(size, 1, SIDE, SIDE + self.shift)
            canvas[:, 0, :, :SIDE] = images[left]
            canvas[:, 0, :, self.shift:] = torch.maximum(canvas[:, 0, :, self.shift:], images[right])
            data[f"x_{split}"] = canvas
            data[f"y_{split}"] = torch.stack([labels[left], labels[right]])
        return data

    def build_model(self) -> HardSharing:
        return HardSharing(digits_backbone(SIDE + self.shift), [nn.Linear(64, 10) for _ in TASKS])

    def losses(self, predictions: Any, targets: Tensor) -> list[Tensor]:
        return [nn.functional.cross_entropy(p, t) for p, t in zip(predictions, targets)]

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        x, y = self.data["x_test"].to(device), self.data["y_test"].to(device)
        return {name: {"accuracy": float((p.argmax(-1) == t).float().mean())}
                for name, p, t in zip(self.task_names, mtl(x), y)}
