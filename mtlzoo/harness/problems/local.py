"""What the standard benchmarks share (:class:`LocalBenchmark`): a data set read from a local folder, a
recipe with epochs, and a fast loader.

**The loader.** One batch is one item of a ``torch.utils.data.DataLoader`` (``batch_size=None``):
a sampler draws the epoch's order and one seed per batch from the harness's generator, a worker
decodes the batch's files and applies the batch's random augmentation from that seed, vectorised,
and the batch comes back in pinned memory when a GPU is present. So the data order and the
augmentation depend on the seed only, not on the number of workers, and nothing of the loader
touches torch's global random state.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mtlzoo.errors import DataError
from mtlzoo.harness.problems.base import Batch, Problem
from mtlzoo.strategy import check_int

SMOKE_STEPS = 3
"""Optimizer steps of a run at ``scale="smoke"``."""
SMOKE_TEST = 8
"""Test (and validation) samples evaluated at ``scale="smoke"``."""
SCALES = ("full", "smoke")
_SCHEDULE = re.compile(r"^\s*(step|plateau)\s*\(([^)]*)\)\s*$")


def parse_schedule(text: str | None) -> tuple[str, tuple[float, ...]]:
    """``"none"``, ``"step(S, G)"`` (times G every S epochs) or ``"plateau(F, P, M)"`` (times F after P epochs
    without a better validation score, down to M) as (kind, numbers).

    Raises:
        ValueError: Another text (the message lists the forms).
    """
    if text is None or str(text).strip().lower() in ("none", "constant", ""):
        return "none", ()
    match = _SCHEDULE.match(str(text))
    try:
        if match is None:
            raise ValueError
        numbers = tuple(float(part) for part in match.group(2).split(","))
        if len(numbers) != {"step": 2, "plateau": 3}[match.group(1)] or not all(n > 0 for n in numbers[:2]):
            raise ValueError
    except ValueError:
        raise ValueError(f"Parameter `lr_schedule` should be 'none', 'step(EPOCHS, GAMMA)' or "
                         f"'plateau(FACTOR, PATIENCE, MIN_LR)'. Found `lr_schedule = {text!r}`.") from None
    return match.group(1), numbers


class _Batches(torch.utils.data.Sampler):
    """The index batches of one pass, each with the seed of its random augmentation (both drawn from ``generator``)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator | None) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        if self.generator is None:
            order, base = torch.arange(self.size), 0
        else:
            order = torch.randperm(self.size, generator=self.generator)
            base = int(torch.randint(0, 2 ** 62, (), generator=self.generator))
        for number, start in enumerate(range(0, self.size, self.batch_size)):
            yield base + number, order[start:start + self.batch_size].tolist()


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, fetch: Callable[[list[int], int | None], Any], augment: bool) -> None:
        self.fetch, self.augment = fetch, augment

    def __getitem__(self, key: tuple[int, list[int]]) -> Any:
        seed, indices = key
        return self.fetch(indices, seed if self.augment else None)


def batch_loader(fetch: Callable[[list[int], int | None], Any], size: int, batch_size: int, *,
                 generator: torch.Generator | None, workers: int, augment: bool = False) -> torch.utils.data.DataLoader:
    """A loader of ``fetch(indices, seed)`` over ``size`` samples in batches of ``batch_size`` (the last one
    partial, as the papers' loaders keep it), shuffled by ``generator`` (``None``: in order, no augmentation).

    ``seed`` is ``None`` when ``augment`` is off or the pass is not shuffled.
    """
    loader_generator = None if generator is None else torch.Generator().manual_seed(
        int(torch.randint(0, 2 ** 62, (), generator=generator)))
    return torch.utils.data.DataLoader(
        _BatchDataset(fetch, augment and generator is not None), batch_size=None,
        sampler=_Batches(size, batch_size, generator), num_workers=workers,
        pin_memory=torch.cuda.is_available(), generator=loader_generator)


def missing_file(root: Path, names: Sequence[str], layout: str, problem: str) -> DataError:
    """The error for the first of ``names`` (relative to ``root``) that is absent."""
    return DataError(f"Problem {problem!r}: the data folder {root} has no {names[0]}"
                     + (f" (nor {len(names) - 1} other expected files)" if len(names) > 1 else "")
                     + f". It should hold:\n{layout}")


@dataclass(frozen=True)
class LocalBenchmark(Problem):
    """Base of the benchmarks read from a local folder (not registered itself).

    Subclasses declare the recipe's defaults as fields (``batch_size``, ``epochs``, ``lr``,
    ``lr_schedule``) and implement :meth:`check_data` (raise :class:`~mtlzoo.errors.DataError`),
    :attr:`train_size` and the problem's methods.

    Args:
        data: The folder holding the data set in the layout of :attr:`layout`.
        scale: ``"full"`` (the paper's recipe) or ``"smoke"`` (a few steps, one seed, a few test samples).
        workers: Loader worker processes (``None``: the CPU cores, at most 8; 0: in the main process).
    """

    data: str = ""
    scale: str = "full"
    workers: int | None = None

    layout: ClassVar[str] = ""
    """The folder's expected layout, for errors and ``--help-problem``."""
    in_default: ClassVar[bool] = False
    default_seeds: ClassVar[int] = 3
    full_seeds: ClassVar[int] = 3

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"Parameter `scale` should be 'full' or 'smoke'. Found `scale = {self.scale!r}`.")
        for field in ("batch_size", "epochs"):
            check_int(field, getattr(self, field))
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"Parameter `workers` should be an int >= 0 or None. Found `workers = {self.workers!r}`.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"Parameter `lr` should be a positive number. Found `lr = {self.lr!r}`.")
        parse_schedule(self.lr_schedule)
        if not self.data:
            raise DataError(f"Problem {self.name!r} reads its data set from a local folder: give it with --data PATH "
                            f"(or '{self.name}:data=PATH'). The folder should hold:\n{self.layout}")
        if not self.root.is_dir():
            raise DataError(f"Problem {self.name!r}: the data folder {self.root} does not exist. It should hold:\n"
                            f"{self.layout}")
        self.check_data()

    @property
    def root(self) -> Path:
        return Path(self.data).expanduser()

    @property
    def model_lr(self) -> float:  # type: ignore[override]
        return float(self.lr)  # type: ignore[attr-defined]

    @property
    def loader_workers(self) -> int:
        return min(8, os.cpu_count() or 1) if self.workers is None else self.workers

    @property
    def smoke(self) -> bool:
        return self.scale == "smoke"

    @property
    def train_size(self) -> int:
        raise NotImplementedError

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.batch_size)  # type: ignore[attr-defined]

    @property
    def run_steps(self) -> int:
        return SMOKE_STEPS if self.smoke else self.epochs * self.steps_per_epoch  # type: ignore[attr-defined]

    @property
    def run_seeds(self) -> int:
        return 1 if self.smoke else self.default_seeds

    def limit(self, size: int) -> int:
        """How many of ``size`` held-out samples an evaluation reads (all but at smoke scale)."""
        return min(size, SMOKE_TEST) if self.smoke else size

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        kind, numbers = parse_schedule(self.lr_schedule)  # type: ignore[attr-defined]
        if kind == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(numbers[0]), gamma=numbers[1])
        if kind == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=numbers[0],
                                                              patience=int(numbers[1]), min_lr=numbers[2])
        return None

    def check_data(self) -> None:
        """Raise :class:`~mtlzoo.errors.DataError` unless :attr:`root` holds the data set in :attr:`layout`."""
        raise NotImplementedError

    def fetch(self, split: str, indices: list[int], seed: int | None) -> Any:
        """The batch of the samples ``indices`` of ``split``, augmented from ``seed`` (``None``: not augmented)."""
        raise NotImplementedError

    def loader(self, split: str, batch_size: int, size: int, generator: torch.Generator | None = None, *,
               augment: bool = False) -> torch.utils.data.DataLoader:
        """:func:`batch_loader` of :meth:`fetch` over ``size`` samples of ``split``."""
        return batch_loader(lambda indices, seed: self.fetch(split, indices, seed), size, batch_size,
                            generator=generator, workers=self.loader_workers, augment=augment)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        yield from self.loader("train", self.batch_size, self.train_size, generator)  # type: ignore[attr-defined]
