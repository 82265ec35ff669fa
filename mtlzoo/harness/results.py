r"""What runs produce (:class:`RunResult`) and what a comparison's runs say (:class:`ComparisonResults`).

**Δm%** (as Nash-MTL and FAMO report it; lower is better)::

    Δm% = (100 / K) sum_k (-1)^{h_k} (M_k - M_ref,k) / M_ref,k,     h_k = 1 when higher M_k is better

with ``M_k`` task k's primary metric (the first of its :attr:`Problem.task_metrics
<mtlzoo.harness.problems.Problem.task_metrics>`), ``h_k`` that metric's direction, and ``M_ref`` the metrics of ``ls``
on the same seed (with ``reference="single_task"``: of K single-task runs, ``ls`` weighted by the k-th unit vector from
the same initialisation, or their mean over the seeds of an earlier comparison, ``reference_from``), for problems whose
metrics are bounded away from zero. Where a problem's papers average over every metric of every task (NYUv2's nine), the
sum runs over its :attr:`~mtlzoo.harness.problems.Problem.delta_m_terms` and K is their number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from mtlzoo.harness.config import Reference
from mtlzoo.harness.spec import BASELINE

if TYPE_CHECKING:
    from mtlzoo.harness.problems.base import Problem

FORMAT_VERSION = 1
"""The version of ``results.json`` and of the run files (files without per-task metrics load as before)."""
DERIVED = ("worst", "delta_m", "rank", "seconds_per_step", "time_ratio", "conflict_share", "mean_cosine")
"""The values derived from each run, averaged over seeds in :meth:`ComparisonResults.summary`."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values (tensors as lists, other objects as their ``repr``)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass
class RunResult:
    """One strategy trained on one problem from one seed.

    Attributes:
        problem: The problem's name; ``settings`` its settings.
        label: The strategy as the results name it; ``strategy`` its registered name; ``options``
            its hyperparameters; ``optimizer`` the (type, lr) of its own parameters, if any.
        seed: The seed (initialisation, data order, the strategy's own draws).
        role: ``"strategy"``, or ``"reference"`` for single-task reference runs (``task`` names it).
        status: ``"ok"`` or ``"failed"`` (``error`` says why; ``steps_done`` how far it got).
        metrics: ``{task: {metric: value}}`` on the test data after training.
        train_losses: Per step, the K training losses (raw, before any weighting).
        seconds_per_step: Median wall time of a training step (zero_grad, forward, backward, step);
            ``seconds_mean`` the mean, ``wall_seconds`` the whole run.
        conflicts: ``{"steps": [...], "cosines": [[cos of each task pair i < j], ...]}``.
        trace: What the problem records per step for plots (toy2d: each task's output point).
        evaluations: Each test evaluation that ``metrics`` summarises (after the last epochs, or at each
            improvement of the validation score): ``{"step", "epoch", "validation", "metrics"}``.
        warnings: The distinct warnings the run raised.
        fingerprint: The run's settings, hashed (a resumed comparison reuses a run with the same one).
    """

    problem: str
    settings: dict[str, Any]
    label: str
    strategy: str
    options: dict[str, Any]
    optimizer: list[Any] | None
    seed: int
    steps: int
    role: str = "strategy"
    task: str | None = None
    status: str = "ok"
    error: str | None = None
    steps_done: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_losses: list[list[float]] = field(default_factory=list)
    seconds_per_step: float | None = None
    seconds_mean: float | None = None
    wall_seconds: float | None = None
    conflicts: dict[str, list[Any]] = field(default_factory=lambda: {"steps": [], "cosines": []})
    trace: list[Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """The mean and standard deviation of the finite values (``None, None`` when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def ranks(values: Mapping[str, float], higher_is_better: bool) -> dict[str, float]:
    """Rank 1 for the best; ties share the mean of their ranks."""
    sign = -1 if higher_is_better else 1
    return {key: sum(sign * other < sign * value for other in values.values())  # better ones
            + (sum(other == value for other in values.values()) + 1) / 2  # ties, itself included
            for key, value in values.items()}


def describe_problem(problem: Problem) -> dict[str, Any]:
    """What the results keep of a problem: name, settings, tasks, metrics (with directions), Δm%."""
    return {"name": problem.name, "settings": jsonable(problem.settings), "task_names": problem.task_names,
            "delta_m": problem.delta_m,
            "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better, "description": m.description}
                        for m in problem.metrics],
            "task_metrics": {task: list(names) for task, names in problem.task_metrics.items()},
            "delta_m_terms": [list(term) for term in problem.delta_m_terms]}


class ComparisonResults:
    """The runs of one comparison on one problem, and what they say.

    Attributes:
        problem: The problem's name; ``settings``, ``task_names``, ``metrics`` (dicts with
            ``name``, ``higher_is_better``), ``task_metrics`` (each task's metric names, its primary
            one first) and ``delta_m`` (whether Δm% applies) describe it.
        runs: Every :class:`RunResult` (strategies and reference runs).
        labels: The strategies, in order (``ls`` first).
        reference: ``"ls"`` or ``"single_task"``.
        external_reference: With ``reference_from``, the single-task metrics read from an earlier
            comparison (``{task: {metric: mean over its seeds}}``); ``None`` otherwise.
    """

    def __init__(self, problem: Problem | Mapping[str, Any], runs: list[RunResult], labels: list[str],
                 reference: Reference = "ls", *, steps: int = 0, seeds: Sequence[int] = (),
                 external_reference: Mapping[str, Mapping[str, float]] | None = None) -> None:
        described = problem if isinstance(problem, Mapping) else describe_problem(problem)
        self.problem: str = described["name"]
        self.settings: dict[str, Any] = dict(described["settings"])
        self.task_names: list[str] = list(described["task_names"])
        self.delta_m: bool = bool(described["delta_m"])
        self.metrics: list[dict[str, Any]] = [dict(m) for m in described["metrics"]]
        every = [m["name"] for m in self.metrics]
        task_metrics = described.get("task_metrics") or {task: every for task in self.task_names}
        self.task_metrics: dict[str, list[str]] = {task: list(task_metrics[task]) for task in self.task_names}
        terms = described.get("delta_m_terms") or [(task, self.task_metrics[task][0]) for task in self.task_names]
        self.delta_m_terms: list[tuple[str, str]] = [(str(task), str(name)) for task, name in terms]
        self.external_reference = None if external_reference is None else {
            task: dict(values) for task, values in external_reference.items()}
        self.runs, self.labels, self.reference, self.steps, self.seeds = runs, labels, reference, steps, list(seeds)

    @property
    def primary(self) -> dict[str, Any]:
        """The first task's primary metric (every task's, unless tasks report different metrics)."""
        return self.primary_of(self.task_names[0])

    def metric(self, name: str) -> dict[str, Any]:
        """The declared metric called ``name`` (``name``, ``higher_is_better``, ``description``)."""
        return next(m for m in self.metrics if m["name"] == name)

    def primary_of(self, task: str) -> dict[str, Any]:
        """Task ``task``'s primary metric: the first it reports."""
        return self.metric(self.task_metrics[task][0])

    @property
    def shared_primary(self) -> bool:
        """Whether every task has the same primary metric (then a worst task is defined)."""
        return len({self.task_metrics[task][0] for task in self.task_names}) == 1

    def columns(self) -> list[tuple[str, dict[str, Any]]]:
        """Every (task, metric) pair the runs report, task by task, each task's primary metric first."""
        return [(task, self.metric(name)) for task in self.task_names for name in self.task_metrics[task]]

    def shared_metrics(self) -> list[str]:
        """The metrics every task reports (their mean over tasks is a column: CelebA's mean F1 and accuracy)."""
        return [m["name"] for m in self.metrics if all(m["name"] in names for names in self.task_metrics.values())]

    def runs_of(self, label: str) -> list[RunResult]:
        return [r for r in self.runs if r.label == label and r.role == "strategy"]

    def run(self, label: str, seed: int) -> RunResult | None:
        return next((r for r in self.runs if r.label == label and r.seed == seed), None)

    def failures(self) -> list[RunResult]:
        return [r for r in self.runs if not r.ok]

    def failed_labels(self) -> list[str]:
        """The strategies without one finished run (every seed failed)."""
        return [label for label in self.labels if not any(r.ok for r in self.runs_of(label))]

    def _primary_value(self, result: RunResult, task: str) -> float:
        return result.metrics[task][self.task_metrics[task][0]]

    def _reference_metrics(self, seed: int) -> dict[str, dict[str, float]] | None:
        """Per task, the reference's metrics for seed ``seed`` (``None`` when it did not finish)."""
        if self.external_reference is not None:
            return self.external_reference
        if self.reference == "single_task":
            refs = {task: self.run(f"single_task[{task}]", seed) for task in self.task_names}
            if any(ref is None or not ref.ok for ref in refs.values()):
                return None
            return {task: ref.metrics[task] for task, ref in refs.items()}  # type: ignore[union-attr]
        ref = self.run(BASELINE, seed)
        return ref.metrics if ref is not None and ref.ok else None

    def delta_m_of(self, result: RunResult) -> float | None:
        """Δm% of a run against the reference of its seed (``None`` where it does not apply)."""
        if not self.delta_m or not result.ok:
            return None
        reference = self._reference_metrics(result.seed)
        if reference is None:
            return None
        terms = []
        for task, name in self.delta_m_terms:
            base = reference.get(task, {}).get(name)
            if base is None or base == 0:
                return None
            sign = -1.0 if self.metric(name)["higher_is_better"] else 1.0
            terms.append(sign * (result.metrics[task][name] - base) / base)
        return 100.0 * sum(terms) / len(terms)

    def mean_ranks(self, seed: int) -> dict[str, float]:
        """Per strategy that finished seed ``seed``: its rank on each task's primary metric, averaged over tasks."""
        finished = {r.label: r for r in self.runs if r.seed == seed and r.role == "strategy" and r.ok}
        totals = dict.fromkeys(finished, 0.0)
        for task in self.task_names:
            higher = self.primary_of(task)["higher_is_better"]
            for label, rank in ranks({lb: self._primary_value(r, task) for lb, r in finished.items()}, higher).items():
                totals[label] += rank / len(self.task_names)
        return totals

    def time_ratio_of(self, result: RunResult) -> float | None:
        """Seconds per step of a run over those of ``ls`` on the same seed."""
        base = self.run(BASELINE, result.seed)
        if base is None or not result.ok or not base.ok or not base.seconds_per_step or result.seconds_per_step is None:
            return None
        return result.seconds_per_step / base.seconds_per_step

    def worst_of(self, result: RunResult) -> float | None:
        """The worst task's primary metric (the largest loss, the lowest accuracy); ``None`` when the
        tasks' primary metrics differ."""
        if not result.ok or not self.shared_primary:
            return None
        values = [self._primary_value(result, t) for t in self.task_names]
        return min(values) if self.primary["higher_is_better"] else max(values)

    @staticmethod
    def conflict_share(result: RunResult) -> float | None:
        """The share of measurements in which some pair of task gradients conflicts (cosine < 0)."""
        cosines = result.conflicts.get("cosines") or []
        return sum(1.0 for pairs in cosines if pairs and min(pairs) < 0) / len(cosines) if cosines else None

    @staticmethod
    def mean_cosine(result: RunResult) -> float | None:
        values = [c for pairs in (result.conflicts.get("cosines") or []) for c in pairs]
        return statistics.fmean(values) if values else None

    def _seed_ranks(self) -> dict[int, dict[str, float]]:
        return {seed: self.mean_ranks(seed) for seed in sorted({r.seed for r in self.runs})}

    def _derived(self, r: RunResult, seed_ranks: dict[int, dict[str, float]]) -> dict[str, float | None]:
        return {"worst": self.worst_of(r), "delta_m": self.delta_m_of(r),
                "rank": seed_ranks.get(r.seed, {}).get(r.label) if r.role == "strategy" else None,
                "seconds_per_step": r.seconds_per_step, "time_ratio": self.time_ratio_of(r),
                "conflict_share": self.conflict_share(r), "mean_cosine": self.mean_cosine(r)}

    def summary(self) -> list[dict[str, Any]]:
        """One row per strategy: means and standard deviations over its finished seeds.

        Keys: ``strategy``, ``ok`` / ``runs``, ``error`` (the first failure's), for each task and each of its metrics
        ``<task>/<metric>`` and ``<task>/<metric>_std``, for each metric every task reports its mean over the tasks
        ``mean/<metric>`` (and ``_std`` over seeds), ``worst`` (worst task's primary metric), ``delta_m``, ``rank``,
        ``seconds_per_step``, ``time_ratio``, ``conflict_share``, ``mean_cosine`` (each with ``_std``).
        """
        seed_ranks = self._seed_ranks()
        rows = []
        for label in self.labels:
            runs = self.runs_of(label)
            finished = [r for r in runs if r.ok]
            row: dict[str, Any] = {"strategy": label, "ok": len(finished), "runs": len(runs),
                                   "error": next((r.error for r in runs if not r.ok), None)}
            for task, metric in self.columns():
                key = f"{task}/{metric['name']}"
                row[key], row[key + "_std"] = mean_std([r.metrics[task][metric["name"]] for r in finished])
            for name in self.shared_metrics():
                row[f"mean/{name}"], row[f"mean/{name}_std"] = mean_std(
                    [statistics.fmean(r.metrics[task][name] for task in self.task_names) for r in finished])
            derived = [self._derived(r, seed_ranks) for r in finished]
            for key in DERIVED:
                row[key], row[key + "_std"] = mean_std([values[key] for values in derived])
            rows.append(row)
        return rows

    def to_records(self) -> list[dict[str, Any]]:
        """One flat row per run (pandas-friendly): ids, status, each ``<task>/<metric>``, derived values."""
        seed_ranks = self._seed_ranks()
        records = []
        for r in self.runs:
            record: dict[str, Any] = {"problem": self.problem, "strategy": r.label, "name": r.strategy,
                                      "role": r.role, "seed": r.seed, "status": r.status, "error": r.error,
                                      "steps": r.steps, "steps_done": r.steps_done}
            for task, metric in self.columns():
                record[f"{task}/{metric['name']}"] = r.metrics.get(task, {}).get(metric["name"])
            record.update(self._derived(r, seed_ranks),
                          final_train_losses=r.train_losses[-1] if r.train_losses else None)
            records.append(record)
        return records

    def to_dataframe(self) -> Any:
        """:meth:`to_records` as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas

        return pandas.DataFrame(self.to_records())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "problem": self.problem, "settings": self.settings,
                "task_names": self.task_names, "delta_m": self.delta_m, "metrics": self.metrics,
                "task_metrics": self.task_metrics, "delta_m_terms": [list(t) for t in self.delta_m_terms],
                "external_reference": self.external_reference, "labels": self.labels, "reference": self.reference,
                "steps": self.steps, "seeds": self.seeds, "summary": self.summary(),
                "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonResults:
        """Read back :meth:`to_dict` (also of files written before tasks could report different metrics)."""
        return cls({**data, "name": data["problem"]}, [RunResult.from_dict(r) for r in data["runs"]],
                   list(data["labels"]), data.get("reference", "ls"), steps=data.get("steps", 0),
                   seeds=data.get("seeds", ()), external_reference=data.get("external_reference"))
