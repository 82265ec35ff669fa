"""Plots of a comparison: written as PNG files that show data, one series per strategy.

Reference: issue 10's check (each image is not blank and has one series per strategy, read from the
figure before it is saved); the series are counted from matplotlib's own artists and their labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from mtlzoo.harness import StrategySpec, compare  # noqa: E402
from mtlzoo.harness.plots import figures, loss_curves, pareto, save_plots, trajectories  # noqa: E402
from mtlzoo.harness.problems import GradNormSynthetic, Toy2D  # noqa: E402

STRATEGIES = ["rotograd", StrategySpec("rotate_only", {"normalize_losses": False}), "test_never_runs"]


@pytest.fixture(scope="module")
def toy() -> Any:
    import mtlzoo
    from mtlzoo.registry import REGISTRY
    from tests.harness.test_comparison import NeedsValue

    mtlzoo.register_strategy(NeedsValue)  # fails on every seed (no value for `beta`): it gets no series
    try:
        spec = StrategySpec("test_needs_value", label="test_never_runs")
        return compare(Toy2D(), [*STRATEGIES[:2], spec], seeds=2, steps=40, strict=False)
    finally:
        REGISTRY.unregister_plugin(mtlzoo.get_strategy("test_needs_value").origin.plugin)


@pytest.fixture(scope="module")
def synthetic() -> Any:
    return compare(GradNormSynthetic(num_tasks=3, sigmas=[1, 10, 100], train_size=300, test_size=100),
                   ["rotograd"], seeds=2, steps=12)


FINISHED = ["ls", "rotograd", "rotate_only:normalize_losses=False"]


def _labelled(artists: Any) -> list[str]:
    return [a.get_label() for a in artists if not a.get_label().startswith("_")]


def test_loss_curves_have_one_line_per_strategy_and_task(toy: Any) -> None:
    fig = loss_curves(toy)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax in axes:
        assert _labelled(ax.get_lines()) == FINISHED
        for line in ax.get_lines():
            assert len(line.get_xdata()) == 40


def test_pareto_has_one_series_per_strategy_with_a_point_per_seed(toy: Any, synthetic: Any) -> None:
    (ax,) = [ax for ax in pareto(toy).axes if ax.get_visible()]
    series = [c for c in ax.collections if not c.get_label().startswith("_")]
    assert [c.get_label() for c in series] == FINISHED
    assert all(len(c.get_offsets()) == 2 for c in series)  # one point per seed
    three = [ax for ax in pareto(synthetic).axes if ax.get_visible()]
    assert len(three) == 3  # every pair of the three tasks
    assert all(_labelled(ax.collections) == ["ls", "rotograd"] for ax in three)


def test_trajectories_follow_each_tasks_output(toy: Any) -> None:
    fig = trajectories(toy)
    for k, ax in enumerate(fig.axes):
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in lines] == FINISHED
        run = toy.run("ls", 0)
        assert list(lines[0].get_xdata()) == pytest.approx([point[k][0] for point in run.trace])


def test_saved_images_are_pngs_that_show_data(toy: Any, synthetic: Any, tmp_path: Path) -> None:
    paths = save_plots([toy, synthetic], tmp_path)
    assert sorted(p.name for p in paths) == sorted([
        "toy2d_losses.png", "toy2d_pareto.png", "toy2d_trajectories.png",
        "gradnorm_synthetic_losses.png", "gradnorm_synthetic_pareto.png"])
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(path)[..., :3]
        not_white = (pixels < 0.95).any(axis=-1).mean()
        # axes, ticks, text, contours and the optima are black, grey or white; only the strategies' series (and
        # their legend's handles) are coloured: an empty axes has no coloured pixel at all
        coloured = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.25).mean()
        assert not_white > 0.03, f"{path.name} is nearly blank"  # an empty axes: 0.023
        assert coloured > 0.001, f"{path.name} has no coloured series: no data drawn?"
    assert set(figures(toy)) == {"toy2d_losses", "toy2d_pareto", "toy2d_trajectories"}


def _legend_texts(fig: Any) -> list[str]:
    return [text.get_text() for legend in fig.legends for text in legend.get_texts()]


def test_the_legend_says_which_strategies_failed(toy: Any) -> None:
    """Issue 19, item 21: a strategy without a finished run is not dropped silently: the legend names it."""
    for fig in figures(toy).values():
        texts = _legend_texts(fig)
        assert "test_never_runs (failed, not shown)" in texts
        assert set(FINISHED) <= set(texts)


def _many(count: int) -> Any:
    """A made-up comparison of ``count`` strategies (one run each, one seed failed for the last one)."""
    from mtlzoo.harness import ComparisonResults, RunResult

    problem = {"name": "p", "settings": {}, "task_names": ["a", "b"], "delta_m": False,
               "metrics": [{"name": "m", "higher_is_better": False}]}
    labels = [f"s{i}" for i in range(count)]
    runs = [RunResult("p", {}, label, label, {}, None, seed, 4, metrics={"a": {"m": 1.0 + i}, "b": {"m": 2.0 - i}},
                      train_losses=[[1.0 + i, 2.0]] * 4, status="failed" if (i, seed) == (count - 1, 1) else "ok")
            for i, label in enumerate(labels) for seed in (0, 1)]
    return ComparisonResults(problem, runs, labels, steps=4, seeds=[0, 1])


@pytest.mark.parametrize("count", [11, 25, 45])
def test_every_strategy_has_its_own_colour_past_ten(count: int) -> None:
    """Issue 19, item 21: no two strategies share a colour (the default palette repeats after ten); the legend
    says when a strategy lost seeds."""
    results = _many(count)
    fig = loss_curves(results)
    colours = [matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()]
    assert len(colours) == count and len(set(colours)) == count
    assert f"s{count - 1} (1/2 seeds)" in _legend_texts(fig)
    points = pareto(results).axes[0].collections[::2]  # a dot per seed, then the mean, per strategy
    assert len({matplotlib.colors.to_hex(c.get_facecolor()[0]) for c in points}) == count
