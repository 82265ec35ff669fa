"""How a comparison runs (:class:`RunConfig`): one object, passed whole from the command line to every run,
checked in one place (its constructor and :meth:`RunConfig.check_out`) before any training."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from mtlzoo.errors import ComparisonError
from mtlzoo.strategy import check_int

if TYPE_CHECKING:
    from mtlzoo.harness.problems.base import Problem

Reference = Literal["ls", "single_task"]
REFERENCES = ("ls", "single_task")
RUNS_DIR = "runs"
"""The folder under ``out`` that holds one JSON file per finished run."""


def slug(text: str) -> str:
    """``text`` as a file name: runs of other characters than ``A-Za-z0-9_.=-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:120] or "run"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, after allocating on it once.

    Raises:
        ComparisonError: torch cannot use it (``"cuda"`` without a GPU, a misspelled name).
    """
    try:
        device = torch.device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ComparisonError(f"Device {str(device)!r} cannot be used here: {error}") from None
    return device


def check_reference(reference: str) -> None:
    """Raise :class:`~mtlzoo.errors.ComparisonError` unless ``reference`` is ``"ls"`` or ``"single_task"``."""
    if reference not in REFERENCES:
        raise ComparisonError(f"Parameter `reference` should be 'ls' or 'single_task'. Found {reference!r}.")


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    try:
        check_int(name, value, minimum)
    except ValueError as error:
        raise ComparisonError(str(error)) from None


@dataclass(frozen=True)
class RunConfig:
    """The settings of a comparison that are the same for every strategy (checked on construction).

    Attributes:
        seeds: A number of seeds (``0 .. n-1``) or the seeds themselves (``None``: the problem's ``run_seeds``).
        steps: Optimizer steps per run (``None``: the problem's ``run_steps``).
        reference: What Δm% is measured against: ``"ls"``, or ``"single_task"`` (K more runs per seed).
        reference_from: A folder holding an earlier comparison's single-task runs on the same problem
            (``--reference single_task --out DIR``): Δm% is measured against their mean over seeds, and
            none is trained (``reference`` is then ``"single_task"``).
        conflict_every: Steps between two gradient-conflict measurements (0 disables them).
        device: Where to train.
        out: A folder: each finished run is written there as it ends (``runs/<problem>/...json``).
        resume: Reuse the runs already in ``out`` that were made with the same settings.
        strict: Raise (rather than record as failed) for a strategy that cannot run on the problem;
            ``None``: when strategies are named.
        threads: torch's CPU threads during the runs (restored after); ``None`` keeps torch's setting.
            One is the fastest for the built-in problems' small models, and gives steadier timings.

    Raises:
        ComparisonError: A value out of range (the message names the field).
    """

    seeds: int | tuple[int, ...] | None = None
    steps: int | None = None
    reference: Reference = "ls"
    reference_from: Path | None = None
    conflict_every: int = 10
    device: str = "cpu"
    out: Path | None = None
    resume: bool = False
    strict: bool | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.seeds is not None and not isinstance(self.seeds, int):
            object.__setattr__(self, "seeds", tuple(int(seed) for seed in self.seeds))  # type: ignore[union-attr]
            if not self.seeds:
                raise ComparisonError("Parameter `seeds` should name at least one seed. Found none.")
        elif self.seeds is not None:
            _check_int("seeds", self.seeds)
        for name in ("steps", "threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        _check_int("conflict_every", self.conflict_every, minimum=0)
        check_reference(self.reference)
        if self.reference_from is not None:
            object.__setattr__(self, "reference_from", Path(self.reference_from))
            object.__setattr__(self, "reference", "single_task")
        object.__setattr__(self, "device", str(check_device(self.device)))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def trained_reference(self) -> Reference:
        """The reference the comparison trains itself: ``"ls"`` when the single-task runs are read from disk."""
        return "ls" if self.reference_from is not None else self.reference

    def seeds_for(self, problem: Problem) -> list[int]:
        """The seeds of the runs on ``problem``."""
        seeds = problem.run_seeds if self.seeds is None else self.seeds
        return list(range(seeds)) if isinstance(seeds, int) else list(seeds)

    def steps_for(self, problem: Problem) -> int:
        """The optimizer steps of each run on ``problem``."""
        return problem.run_steps if self.steps is None else self.steps

    def runs_folder(self, problem: str) -> Path | None:
        """Where the finished runs on the problem named ``problem`` are written (``None`` without ``out``)."""
        return None if self.out is None else self.out / RUNS_DIR / slug(problem)

    def check_out(self, problems: Iterable[str]) -> None:
        """Refuse to train into an ``out`` that already holds runs of these problems, unless ``resume``.

        Raises:
            ComparisonError: The folder holds runs and ``resume`` is off (the message says what to do).
        """
        if self.resume:
            return
        for problem in problems:
            folder = self.runs_folder(problem)
            if folder is not None and folder.exists():
                raise ComparisonError(f"{folder} already holds runs: pass resume=True (--resume) to keep the finished "
                                      "ones and run the rest, or choose another folder (--out).")
