"""What a comparison problem is: data, a model, the task losses, metrics and a training recipe.

A problem is a frozen dataclass whose fields are its settings (``GradNormSynthetic(num_tasks=10)``)
and whose class attributes are its metadata (:class:`Problem`). It generates its data itself from
``data_seed``: the run seed changes the initialisation and the batch order, never the data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.errors import ComparisonError

if TYPE_CHECKING:
    from mtlzoo.registry import StrategyEntry
    from mtlzoo.wrapper import MTLWrapper

Batch = tuple[Any, Any]
"""``(inputs, targets)`` of one training step; tensors (or nested tuples of tensors) on the CPU."""


@dataclass(frozen=True)
class Metric:
    """A test metric reported per task.

    Attributes:
        name: Short name (``"mse"``, ``"accuracy"``).
        higher_is_better: Its direction (``h_k`` in Δm%).
        description: One line for tables and docs.
    """

    name: str
    higher_is_better: bool
    description: str = ""


class Problem:
    """Base class of a comparison problem (subclasses are frozen dataclasses of their settings).

    Class attributes (metadata):
        name: Registry name (lower case, underscores).
        summary: One line.
        source: Where the problem comes from (paper, section).
        literature: What the literature reports on it, for the reader of a comparison.
        metrics: The metrics the problem reports, each with its direction; unless :attr:`task_metrics`
            says otherwise, every task reports all of them and the first is each task's primary one
            (Δm%, ranks, plots).
        delta_m: Whether Δm% is meaningful (metrics bounded away from zero).
        requires: Modules that an optional extra installs (``("sklearn",)``); the problem is listed
            but joins the default comparison only when they are importable.
        extra: The name of that pip extra (``"digits"``).
        in_default: Whether ``mtlzoo compare`` without ``--problem`` runs it (when available).
        default_steps, default_seeds: The scale of the default comparison (about 3 minutes in all).
        full_steps, full_seeds: The scale of the source's own runs, for ``--steps``/``--seeds``.
        model_optimizer, model_lr: The optimizer (a ``torch.optim`` class name) and learning rate of the model.
        average_last: The reported test metrics are the mean of the evaluations after each of the last
            ``average_last`` epochs (as MTAN's and Nash-MTL's tables are); 1: after training only.
        select_by_validation: The reported test metrics are those after the epoch with the lowest
            :meth:`validation_score` (as Nash-MTL's QM9 and FAMO's CelebA runs select them).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    source: ClassVar[str] = ""
    literature: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]]
    delta_m: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    in_default: ClassVar[bool] = True
    default_steps: ClassVar[int]
    default_seeds: ClassVar[int]
    full_steps: ClassVar[int]
    full_seeds: ClassVar[int]
    model_optimizer: ClassVar[str] = "adam"
    model_lr: ClassVar[float] = 1e-3
    average_last: ClassVar[int] = 1
    select_by_validation: ClassVar[bool] = False

    @classmethod
    def available(cls) -> bool:
        """Whether the modules of its optional extra are installed."""
        return all(importlib.util.find_spec(module) is not None for module in cls.requires)

    @classmethod
    def missing_message(cls) -> str:
        """How to install what the problem needs."""
        what = f'"mtlzoo[{cls.extra}]"' if cls.extra else " ".join(cls.requires)
        return f"Problem {cls.name!r} needs {', '.join(cls.requires)}: install it with `python -m pip install {what}`."

    @property
    def settings(self) -> dict[str, Any]:
        """The problem's settings (its dataclass fields), as plain values."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @property
    def task_names(self) -> list[str]:
        """One name per task, in head order (``task0``, ``task1``, ... unless overridden)."""
        return [f"task{k}" for k in range(self.num_tasks)]

    @property
    def num_tasks(self) -> int:
        """K: the length of :attr:`task_names` (a subclass overrides one of the two)."""
        if type(self).task_names is Problem.task_names:
            raise NotImplementedError(f"Problem {self.name!r} should override `num_tasks` or `task_names`.")
        return len(self.task_names)

    @property
    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        """The names of the metrics each task reports, its primary one first; each one of :attr:`metrics`.

        By default every task reports every metric; override it when tasks differ, e.g.
        ``{"digit": ("accuracy",), "value": ("rmse",)}`` (Δm% and ranks use each task's primary metric).
        """
        names = tuple(metric.name for metric in self.metrics)
        return {task: names for task in self.task_names}

    @property
    def steps_per_epoch(self) -> int:
        """How many optimizer steps one epoch of :meth:`epoch` yields."""
        raise NotImplementedError

    @property
    def run_steps(self) -> int:
        """The steps of a run when ``--steps`` is not given: ``default_steps``, unless the problem's
        epochs depend on its data (the benchmarks read from disk: their epochs times their epoch length)."""
        return self.default_steps

    @property
    def run_seeds(self) -> int:
        """The seeds of a comparison when ``--seeds`` is not given: ``default_seeds``, unless set by the problem."""
        return self.default_seeds

    @property
    def delta_m_terms(self) -> list[tuple[str, str]]:
        """The (task, metric) pairs that Δm% averages: by default each task's primary metric; the
        benchmarks' papers average over every metric of every task (NYUv2: 9 terms for 3 tasks)."""
        return [(task, names[0]) for task, names in self.task_metrics.items()]

    def build_model(self) -> nn.Module:
        """A freshly initialised model with ``backbone`` and ``heads`` (drawn from torch's global RNG)."""
        raise NotImplementedError

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        """The training batches of one epoch, in an order drawn from ``generator`` only."""
        raise NotImplementedError

    def losses(self, predictions: Any, targets: Any) -> list[Tensor]:
        """The K task losses of a batch."""
        raise NotImplementedError

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        """Test metrics, ``{task_name: {metric_name: value}}``; called in eval mode under ``torch.no_grad()``."""
        raise NotImplementedError

    def validation_score(self, mtl: MTLWrapper, device: torch.device) -> float:
        """A score on held-out training data, lower is better, for :attr:`select_by_validation` and a
        plateau schedule; called in eval mode under ``torch.no_grad()``."""
        raise NotImplementedError(f"Problem {self.name!r} has no validation set.")

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The model optimizer's learning-rate schedule, stepped after every epoch (a
        ``ReduceLROnPlateau`` with :meth:`validation_score`); ``None``: a constant rate."""
        return None

    def trace(self, predictions: Any) -> list[list[float]] | None:
        """What to record of one training step's predictions for plots (toy2d: each task's point)."""
        return None

    def strategy_options(self, entry: StrategyEntry) -> dict[str, Any]:
        """Hyperparameters a strategy gets on this problem (a run may override them): by default those its
        metadata suggests (``StrategyInfo.suggested``); a problem whose source used others overrides this."""
        return dict(entry.info.suggested)

    def strategy_optimizer(self, entry: StrategyEntry) -> tuple[str, float] | None:
        """The optimizer and learning rate of a strategy's own parameters on this problem, if the
        source prescribes one (else the strategy's metadata default applies)."""
        return None


class InMemoryProblem(Problem):
    """A problem whose training set is in memory: ``data["x_train"]`` (n, ...) and the task-major
    ``data["y_train"]`` (K, n, ...); an epoch is one pass over ``train_size`` of them in shuffled batches."""

    train_size: int
    batch_size: int
    data: dict[str, Tensor]

    @property
    def steps_per_epoch(self) -> int:
        return self.train_size // self.batch_size

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        data = self.data
        for index in shuffled_batches(self.train_size, self.batch_size, generator):
            yield data["x_train"][index], data["y_train"][:, index]


def check_metrics(problem: Problem, reported: dict[str, dict[str, float]]) -> None:
    """Check what ``problem.evaluate`` returned against the problem's declared metrics.

    Raises:
        ComparisonError: A task missing, or a task whose metrics are not those declared for it (the
            message names the task, both sets, and how to declare per-task metrics).
    """
    declared = {metric.name for metric in problem.metrics}
    expected = problem.task_metrics
    where = f"Problem {problem.name!r}"
    if list(expected) != list(problem.task_names):
        raise ComparisonError(f"{where}: `task_metrics` should have one entry per task, in order {problem.task_names}. "
                              f"Found {list(expected)}.")
    for task, names in expected.items():
        if not names:
            raise ComparisonError(f"{where}: task {task!r} declares no metric in `task_metrics`.")
        undeclared = [name for name in names if name not in declared]
        if undeclared:
            raise ComparisonError(f"{where}: task {task!r} reports {undeclared}, which `metrics` does not declare "
                                  f"(it declares {sorted(declared)}): add a Metric(name, higher_is_better) for each.")
    missing = [task for task in problem.task_names if task not in reported]
    if missing:
        raise ComparisonError(f"{where}: evaluate() returned no metrics for the tasks {missing} ({sorted(reported)}).")
    for task, names in expected.items():
        if set(reported[task]) != set(names):
            raise ComparisonError(
                f"{where}: evaluate() returned {sorted(reported[task])} for task {task!r}, which should report "
                f"{sorted(names)}. Tasks reporting different metrics declare them per task: override the property "
                f"`task_metrics`, e.g. {{'{task}': {tuple(sorted(reported[task]))!r}, ...}}.")


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value.tolist() if isinstance(value, Tensor) else value


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor moved to ``device`` (nested tuples, lists and dicts, and objects with a
    ``to(device)`` method such as a torch_geometric batch); a copy from pinned memory does not block."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=device.type == "cuda" and value.is_pinned())
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if callable(getattr(value, "to", None)) and not isinstance(value, (str, bytes, type)):
        return value.to(device)
    return value


def shuffled_batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches of one epoch over ``size`` examples, shuffled by ``generator`` (the last partial one dropped)."""
    order = torch.randperm(size, generator=generator)
    for start in range(0, size - batch_size + 1, batch_size):
        yield order[start:start + batch_size]
