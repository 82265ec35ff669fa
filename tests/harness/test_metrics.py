"""Per-task metrics (issue 19, item 20): tasks that report different metrics, checked before training.

A user's problem whose classifier reports accuracy and whose regression reports RMSE used to train
every strategy and then fail with ``KeyError: 'accuracy'`` in the results. Now the problem declares
each task's metrics (:attr:`Problem.task_metrics`), the harness checks them on the untrained model,
and results, tables and Δm% use each task's own primary metric with its own direction.
Reference for Δm%: Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023), by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from rich.console import Console

from mtlzoo.errors import ComparisonError
from mtlzoo.harness import ComparisonResults, RunResult, compare, load, save
from mtlzoo.harness.problems import GradNormSynthetic, Metric
from mtlzoo.harness.tables import result_tables
from mtlzoo.wrapper import MTLWrapper

SMALL = {"train_size": 200, "test_size": 100, "batch_size": 50}


@dataclass(frozen=True)
class SignAndValue(GradNormSynthetic):
    """task0 is judged as a classifier (the sign of its output: accuracy), task1 as a regression (RMSE)."""

    name: ClassVar[str] = "sign_and_value"
    metrics: ClassVar[tuple[Metric, ...]] = (Metric("accuracy", higher_is_better=True),
                                             Metric("rmse", higher_is_better=False))

    @property
    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        return {"task0": ("accuracy",), "task1": ("rmse",)}

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        x, y = self.data["x_test"].to(device), self.data["y_test"].to(device)
        first, second = mtl(x)
        accuracy = float(((first > 0) == (y[0] > 0)).float().mean())
        rmse = float((second - y[1]).pow(2).mean().sqrt())
        return {"task0": {"accuracy": accuracy}, "task1": {"rmse": rmse}}


@dataclass(frozen=True)
class Undeclared(SignAndValue):
    """The same metrics, but the problem does not say which task reports which (as a user first writes it)."""

    name: ClassVar[str] = "undeclared"

    @property
    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        return GradNormSynthetic.task_metrics.fget(self)  # type: ignore[attr-defined]  # every task, every metric


def test_tasks_with_different_metrics_compare_end_to_end(tmp_path: Any) -> None:
    """The issue's case: trained, tabulated, saved and loaded, each task under its own metric."""
    results = compare(SignAndValue(**SMALL), ["upgrad"], seeds=2, steps=8, conflict_every=0)
    assert all(run.ok for run in results.runs), [run.error for run in results.runs]
    rows = {row["strategy"]: row for row in results.summary()}
    assert set(rows["upgrad"]) >= {"task0/accuracy", "task1/rmse", "delta_m", "rank"}
    assert "task0/rmse" not in rows["upgrad"] and rows["upgrad"]["worst"] is None  # no worst across metrics
    assert rows["ls"]["delta_m"] == 0
    console = Console(width=100, record=True)
    for table in result_tables(results, 100):
        console.print(table)
    text = console.export_text()
    assert "task0 accuracy ↑" in text and "task1 rmse ↓" in text and "worst" not in text
    save([results], tmp_path)
    (loaded,) = load(tmp_path)
    assert loaded.task_metrics == {"task0": ["accuracy"], "task1": ["rmse"]}
    assert loaded.summary() == results.summary()


def test_undeclared_per_task_metrics_fail_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate() that does not report what the problem declares is refused on the untrained model, naming the
    task, both sets of metrics and the fix, before any training."""
    from mtlzoo.harness import training

    monkeypatch.setattr(training, "_train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ComparisonError, match=r"\['accuracy'\] for task 'task0'.*\['accuracy', 'rmse'\].*task_metrics"):
        compare(Undeclared(**SMALL), ["upgrad"], seeds=1, steps=2)


def test_a_task_metric_that_metrics_does_not_declare_is_refused() -> None:
    @dataclass(frozen=True)
    class Misspelt(SignAndValue):
        name: ClassVar[str] = "misspelt"

        @property
        def task_metrics(self) -> dict[str, tuple[str, ...]]:
            return {"task0": ("acuracy",), "task1": ("rmse",)}

    with pytest.raises(ComparisonError, match=r"'task0' reports \['acuracy'\], which `metrics` does not declare"):
        compare(Misspelt(**SMALL), ["ls"], seeds=1, steps=2)


def _run(label: str, accuracy: float, rmse: float) -> RunResult:
    return RunResult("p", {}, label, label, {}, None, 0, 10,
                     metrics={"a": {"accuracy": accuracy}, "b": {"rmse": rmse}}, seconds_per_step=0.01)


def test_delta_m_and_ranks_take_each_tasks_direction() -> None:
    """ls (accuracy 0.8, rmse 2.0), x (0.9, 1.5): Δm% = 50 (-(0.9 - 0.8) / 0.8 + (1.5 - 2.0) / 2.0) = -18.75;
    y (0.7, 1.0) is last on accuracy (higher is better) and first on rmse (lower is better)."""
    problem = {"name": "p", "settings": {}, "task_names": ["a", "b"], "delta_m": True,
               "metrics": [{"name": "accuracy", "higher_is_better": True}, {"name": "rmse", "higher_is_better": False}],
               "task_metrics": {"a": ["accuracy"], "b": ["rmse"]}}
    results = ComparisonResults(problem, [_run("ls", 0.8, 2.0), _run("x", 0.9, 1.5), _run("y", 0.7, 1.0)],
                                ["ls", "x", "y"], steps=10, seeds=[0])
    assert results.delta_m_of(results.run("x", 0)) == pytest.approx(-18.75)
    assert results.mean_ranks(0) == {"ls": pytest.approx(2.5), "x": pytest.approx(1.5), "y": pytest.approx(2.0)}
    assert [(task, metric["name"]) for task, metric in results.columns()] == [("a", "accuracy"), ("b", "rmse")]
