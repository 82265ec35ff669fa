"""Results on disk: the committed comparison (written before per-task metrics) still loads and renders."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from mtlzoo.harness import load
from mtlzoo.harness.tables import result_tables

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "comparison" / "results.json"


def test_the_committed_results_load_and_render() -> None:
    results = load(COMMITTED)
    assert [r.problem for r in results] == ["toy2d", "gradnorm_synthetic", "multidigits", "mixedscale"]
    for result in results:
        every = [metric["name"] for metric in result.metrics]
        if result.problem == "mixedscale":  # tasks with metrics of their own
            assert result.task_metrics == {"digit": ["accuracy"], "large": ["accuracy"], "ink": ["rmse"]}
        else:
            assert result.task_metrics == {task: every for task in result.task_names}
        rows = result.summary()
        assert [row["strategy"] for row in rows] == result.labels
        console = Console(width=100, record=True)
        for table in result_tables(result, 100):
            console.print(table)
        text = console.export_text()
        assert all(label in text for label in result.labels) and "…" not in text
    pytest.importorskip("matplotlib")
    from mtlzoo.harness.plots import figures

    assert set(figures(results[0])) == {"toy2d_losses", "toy2d_pareto", "toy2d_trajectories"}
