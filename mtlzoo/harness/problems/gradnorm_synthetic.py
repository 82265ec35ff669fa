"""``gradnorm_synthetic``: the synthetic regression of the GradNorm paper (Chen et al., ICML 2018, section 4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.harness.problems.base import InMemoryProblem, Metric
from mtlzoo.registry import StrategyEntry
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import check_int
from mtlzoo.wrapper import MTLWrapper

INPUT_DIM = 250
OUTPUT_DIM = 100
HIDDEN = 100
B_STD = 10.0
EPS_STD = 3.5
SIGMAS: dict[int, tuple[float, ...]] = {
    2: (1.0, 100.0),
    10: (48.0, 3.0, 54.0, 16.0, 9.0, 30.0, 52.0, 26.0, 47.0, 81.0),
}
"""The paper's scales: (1, 100) for T = 2; for T = 10 the values in the legend of its Figure 2, as a
public re-implementation transcribes them (not checked against the PDF here)."""


@dataclass(frozen=True)
class GradNormSynthetic(InMemoryProblem):
    r"""GradNorm's synthetic regression: T tasks alike but for their output scales ``sigma_i``.

    Source: Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks*, ICML 2018, section 4 ("A Toy Example"): T tasks learn
    ``f_i(x) = sigma_i tanh((B + eps_i) x)`` with squared loss (inputs of dimension 250, outputs of
    dimension 100), ``B`` shared and ``eps_i`` of task i constant matrices with entries i.i.d. from
    N(0, 10) and N(0, 3.5) (standard deviations, as public re-implementations read them); a 4-layer
    fully connected ReLU trunk of 100 units per layer and one affine layer per task; T = 2 with
    ``(sigma_0, sigma_1) = (1, 100)``, and T = 10; GradNorm's asymmetry ``alpha = 0.12`` (the tasks
    have the same functional form). The paper does not give the input distribution, the data set
    sizes or the optimizer: here ``x`` is uniform on [-1, 1]^250 scaled to unit norm (as public
    re-implementations draw it), 10,000 training and 2,000 test examples, batches of 100, Adam at 1e-3.

    What the literature says: with equal weights the large-``sigma`` task dominates the shared
    trunk and the small-``sigma`` tasks learn slowly; GradNorm's weights grow roughly inversely to
    ``sigma_i`` and reduce the test loss summed over tasks in units of each task's initial loss,
    better than equal weights and uncertainty weighting, most clearly for T = 10.

    Metrics per task: test ``mse``, and ``nmse`` = mse / sigma_i^2 (comparable across tasks).
    Δm% against ``ls`` reads the mse (bounded away from zero on this problem). An epoch: one pass
    over the training set.

    Args:
        num_tasks: T (2 or 10 take the paper's ``sigma``; other values need ``sigmas``).
        sigmas: The T output scales (``None``: the paper's for T = 2 or 10).
        train_size: Training examples.
        test_size: Test examples.
        batch_size: Examples per step.
        data_seed: Seed of ``B``, ``eps_i`` and the examples (the run seed does not change the data).
    """

    num_tasks: int = 2  # type: ignore[assignment]
    sigmas: Sequence[float] | None = None
    train_size: int = 10_000
    test_size: int = 2_000
    batch_size: int = 100
    data_seed: int = 0

    name: ClassVar[str] = "gradnorm_synthetic"
    summary: ClassVar[str] = "GradNorm's synthetic regression: T alike tasks whose output scales differ 100x"
    source: ClassVar[str] = "Chen et al., ICML 2018, section 4 (https://arxiv.org/abs/1711.02257)"
    literature: ClassVar[str] = ("equal weights let the large-sigma task dominate; GradNorm's weights balance the "
                                 "tasks and lower the summed loss ratios")
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("mse", higher_is_better=False, description="test mean squared error"),
        Metric("nmse", higher_is_better=False, description="test mse / sigma_i^2"),
    )
    default_steps: ClassVar[int] = 750
    default_seeds: ClassVar[int] = 3
    full_steps: ClassVar[int] = 25_000
    """250 epochs of 100 batches, as a public re-implementation trains to reproduce the paper's Figure 2 (the
    paper does not state its number of steps)."""
    full_seeds: ClassVar[int] = 5

    def __post_init__(self) -> None:
        for field in ("num_tasks", "train_size", "test_size", "batch_size"):
            check_int(field, getattr(self, field))
        if self.batch_size > self.train_size:
            raise ValueError(f"Parameter `batch_size` should be at most `train_size = {self.train_size}`. "
                             f"Found `batch_size = {self.batch_size}`.")
        if self.sigmas is None and self.num_tasks not in SIGMAS:
            raise ValueError(f"The paper gives sigma for T = 2 and T = 10 only; pass `sigmas` (T numbers) for "
                             f"`num_tasks = {self.num_tasks}`.")
        if self.sigmas is not None:
            values = tuple(self.sigmas)
            if len(values) != self.num_tasks or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < math.inf for s in values):
                raise ValueError(f"Parameter `sigmas` should hold num_tasks = {self.num_tasks} positive numbers. "
                                 f"Found `sigmas = {self.sigmas!r}`.")
            object.__setattr__(self, "sigmas", tuple(float(s) for s in values))

    @property
    def scales(self) -> tuple[float, ...]:
        return SIGMAS[self.num_tasks] if self.sigmas is None else tuple(self.sigmas)

    @cached_property
    def data(self) -> dict[str, Tensor]:
        """``x_train, y_train, x_test, y_test``; ``y`` is (T, n, 100)."""
        generator = torch.Generator().manual_seed(self.data_seed)
        shared = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=generator) * B_STD
        own = torch.randn(self.num_tasks, OUTPUT_DIM, INPUT_DIM, generator=generator) * EPS_STD
        sigma = torch.tensor(self.scales).view(-1, 1, 1)

        def sample(n: int) -> tuple[Tensor, Tensor]:
            x = torch.rand(n, INPUT_DIM, generator=generator) * 2 - 1
            x = x / x.norm(dim=1, keepdim=True)
            y = sigma * torch.tanh(torch.einsum("toi,ni->tno", shared + own, x))
            return x, y

        x_train, y_train = sample(self.train_size)
        x_test, y_test = sample(self.test_size)
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    def build_model(self) -> HardSharing:
        trunk = [m for width in (INPUT_DIM, HIDDEN, HIDDEN, HIDDEN) for m in (nn.Linear(width, HIDDEN), nn.ReLU())]
        return HardSharing(nn.Sequential(*trunk), [nn.Linear(HIDDEN, OUTPUT_DIM) for _ in range(self.num_tasks)])

    def losses(self, predictions: Any, targets: Tensor) -> list[Tensor]:
        return [nn.functional.mse_loss(p, t) for p, t in zip(predictions, targets)]

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        x, y = self.data["x_test"].to(device), self.data["y_test"].to(device)
        mses = [float(nn.functional.mse_loss(p, t)) for p, t in zip(mtl(x), y)]
        return {task: {"mse": mse, "nmse": mse / s**2} for task, mse, s in zip(self.task_names, mses, self.scales)}

    def strategy_options(self, entry: StrategyEntry) -> dict[str, Any]:
        """The metadata's suggestions, with the paper's asymmetry ``alpha = 0.12`` on this problem for every
        strategy whose metadata suggests GradNorm's ``alpha`` (``gradnorm``, ``rotograd_norm``)."""
        options = super().strategy_options(entry)
        if "alpha" in options:
            options["alpha"] = 0.12
        return options
