"""The results of the default `mtlzoo compare`, the README's main job, as CI runs it.

CI runs ``python -m mtlzoo compare --out DIR`` (about 3 minutes on 2 cores), then this file with
``MTLZOO_COMPARE_RESULTS=DIR``; without that variable there is nothing to check and it is skipped.
Reference: issue 10's check (one row per strategy and problem, finite metrics or a recorded
failure, and on toy2d RotoGrad's worst-task loss below ls's: Javaloy & Valera, ICLR 2022, Figure 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from mtlzoo.harness import default_problems, default_strategies, load
from mtlzoo.harness.problems import create_problem

RESULTS = os.environ.get("MTLZOO_COMPARE_RESULTS")
pytestmark = pytest.mark.skipif(not RESULTS, reason="set MTLZOO_COMPARE_RESULTS=DIR after `mtlzoo compare --out DIR`")


@pytest.fixture(scope="module")
def results() -> dict:
    assert RESULTS is not None
    return {result.problem: result for result in load(RESULTS)}


def test_one_row_per_strategy_and_problem(results: dict) -> None:
    assert list(results) == default_problems()
    expected = [spec.name for spec in default_strategies()]
    for name, result in results.items():
        problem = create_problem(name)
        assert result.labels == expected
        assert [row["strategy"] for row in result.summary()] == expected
        assert result.steps == problem.default_steps and result.seeds == list(range(problem.default_seeds))
        for label in expected:
            assert sorted(r.seed for r in result.runs_of(label)) == result.seeds, (name, label)


def test_every_run_has_finite_metrics_or_a_recorded_failure(results: dict) -> None:
    for name, result in results.items():
        for run in result.runs:
            if run.ok:
                values = [run.metrics[task][m["name"]] for task, m in result.columns()]
                assert all(math.isfinite(v) for v in values), (name, run.label, run.seed)
                assert len(run.train_losses) == result.steps
            else:
                assert run.status == "failed" and run.error, (name, run.label, run.seed)


def test_on_toy2d_rotograd_worst_task_loss_is_below_ls(results: dict) -> None:
    rows = {row["strategy"]: row for row in results["toy2d"].summary()}
    assert rows["rotograd"]["ok"] == rows["ls"]["ok"] == len(results["toy2d"].seeds)
    assert rows["rotograd"]["worst"] < rows["ls"]["worst"]


def test_the_plots_were_written() -> None:
    pytest.importorskip("matplotlib")
    folder = Path(str(RESULTS))
    for name in default_problems():
        assert (folder / f"{name}_losses.png").stat().st_size > 10_000
        assert (folder / f"{name}_pareto.png").stat().st_size > 10_000
    assert (folder / "toy2d_trajectories.png").stat().st_size > 10_000
