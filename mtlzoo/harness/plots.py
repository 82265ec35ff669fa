"""Figures of a comparison (matplotlib, the ``plot`` extra): loss curves, Pareto scatter, toy2d trajectories, each a
matplotlib ``Figure`` of a :class:`~mtlzoo.harness.results.ComparisonResults` with one series per strategy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtlzoo.harness.results import ComparisonResults

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = 'Plots need matplotlib: install it with `python -m pip install "mtlzoo[plot]"`.'
MAX_PAIRS = 6


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(MISSING) from error
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _palette(count: int) -> list[Any]:
    """``count`` distinct colours: tab10, then tab20b's and tab20c's 40 shades, then hues spaced evenly."""
    import matplotlib

    colors = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    colors += [matplotlib.colormaps[name](i) for i in range(20) for name in ("tab20b", "tab20c")]
    return colors[:count] if count <= len(colors) else [matplotlib.colormaps["hsv"](i / count) for i in range(count)]


@dataclass(frozen=True)
class Style:
    """How one strategy is drawn: a colour of its own, a line style and a marker."""

    color: Any
    linestyle: str
    marker: str


def styles(labels: Sequence[str]) -> dict[str, Style]:
    """A style per strategy: distinct colours (for any number), and line styles and markers besides, so that
    curves drawn on top of each other stay apart."""
    colors = _palette(len(labels))
    return {label: Style(colors[i], LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)])
            for i, label in enumerate(labels)}


def legend_label(results: ComparisonResults, label: str) -> str:
    """A strategy's name in a legend, with its failed seeds: ``"name"``, ``"name (2/3 seeds)"``,
    ``"name (failed, not shown)"``."""
    runs = results.runs_of(label)
    finished = sum(r.ok for r in runs)
    if finished == len(runs):
        return label
    return f"{label} (failed, not shown)" if not finished else f"{label} ({finished}/{len(runs)} seeds)"


def _legend(fig: Any, ax: Any, results: ComparisonResults) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    shown, drawn = dict(zip(labels, handles)), styles(results.labels)
    handles = [shown.get(label) or Line2D([], [], color=drawn[label].color, marker="x", linestyle="none")
               for label in results.labels]
    labels = [legend_label(results, label) for label in results.labels]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize="small")


def _finished(results: ComparisonResults) -> dict[str, list[Any]]:
    return {label: [r for r in results.runs_of(label) if r.ok] for label in results.labels
            if any(r.ok for r in results.runs_of(label))}


def _smooth(values: torch.Tensor, window: int) -> torch.Tensor:
    if window <= 1 or values.shape[0] < window:
        return values
    kernel = torch.ones(window, dtype=values.dtype) / window
    padded = torch.cat([values[:1].expand(window - 1, *values.shape[1:]), values])
    return torch.nn.functional.conv1d(padded.T.unsqueeze(1), kernel.view(1, 1, -1)).squeeze(1).T


def _panels(count: int, per_row: int, size: Callable[[int, int], tuple[float, float]]) -> tuple[Any, Any]:
    """A figure of ``count`` panels, ``per_row`` to a row (``size(columns, rows)`` inches), and its axes."""
    columns, rows = min(count, per_row), math.ceil(count / per_row)
    fig = _matplotlib()(figsize=size(columns, rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes


def loss_curves(results: ComparisonResults) -> Figure:
    """Training loss per task against the step: the mean over seeds (smoothed), a band of ± one std."""
    tasks = results.task_names
    fig, axes = _panels(len(tasks), 4, lambda columns, rows: (4.5 * columns, 3.6 if rows == 1 else 2.6 * rows))
    finished = _finished(results)
    drawn = styles(results.labels)
    for k, (ax, task) in enumerate(zip(axes, tasks)):
        positive = True
        for label, runs in finished.items():
            curves = [torch.tensor(r.train_losses)[:, k] for r in runs if r.train_losses]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            stacked = torch.stack([c[:length] for c in curves], dim=1).double()
            window = max(1, length // 50)
            mean = _smooth(stacked.mean(1, keepdim=True), window)[:, 0]
            std = _smooth(stacked.std(1, keepdim=True) if stacked.shape[1] > 1 else torch.zeros_like(stacked[:, :1]),
                          window)[:, 0]
            steps = torch.arange(1, length + 1)
            style = drawn[label]
            ax.plot(steps, mean, label=label, color=style.color, linestyle=style.linestyle, linewidth=1.5,
                    marker=style.marker, markevery=max(1, length // 8), markersize=4)
            ax.fill_between(steps, mean - std, mean + std, color=style.color, alpha=0.15, linewidth=0)
            positive = positive and bool((stacked > 0).all())
        if positive and ax.has_data():
            ax.set_yscale("log")
        ax.set(title=task, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0], results)
    fig.suptitle(f"{results.problem}: training losses (mean over seeds, ± 1 std)")
    return fig


def pareto(results: ComparisonResults) -> Figure:
    """Each task pair's primary test metrics (each task's own), one point per seed and a larger one for the mean."""
    tasks = results.task_names
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][:MAX_PAIRS]
    fig, axes = _panels(len(pairs), 3, lambda columns, rows: (max(5.0 * columns, 7.0), 4.4 * rows + 0.8))
    finished = _finished(results)
    drawn = styles(results.labels)

    def axis_label(task: str) -> str:
        metric = results.primary_of(task)
        return f"{task} {metric['name']} ({'higher' if metric['higher_is_better'] else 'lower'} is better)"

    for ax, (i, j) in zip(axes, pairs):
        x_name, y_name = results.primary_of(tasks[i])["name"], results.primary_of(tasks[j])["name"]
        for label, runs in finished.items():
            style = drawn[label]
            xs = [r.metrics[tasks[i]][x_name] for r in runs]
            ys = [r.metrics[tasks[j]][y_name] for r in runs]
            ax.scatter(xs, ys, color=style.color, marker=style.marker, alpha=0.45, s=22, label=label)
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], color=style.color, s=110, marker=style.marker,
                       edgecolors="black", linewidths=0.6, label="_nolegend_")
        ax.set(xlabel=axis_label(tasks[i]), ylabel=axis_label(tasks[j]), title=f"{tasks[i]} vs {tasks[j]}")
        ax.grid(alpha=0.3)
    _legend(fig, axes[0], results)
    shown = "" if len(pairs) == len(tasks) * (len(tasks) - 1) // 2 else f" (first {len(pairs)} pairs)"
    names = " / ".join(dict.fromkeys(results.primary_of(task)["name"] for task in tasks))
    fig.suptitle(f"{results.problem}: test {names}, a dot per seed, the mean outlined{shown}")
    return fig


def trajectories(results: ComparisonResults, seed: int | None = None) -> Figure:
    """toy2d: each task's output during training, over the contours of that task's loss (one seed)."""
    from mtlzoo.harness.problems.toy2d import OPTIMA, SIGNS, toy_values

    Figure = _matplotlib()
    finished = _finished(results)
    if seed is None:
        seed = min((r.seed for runs in finished.values() for r in runs if r.trace), default=0)
    fig = Figure(figsize=(11.5, 5.2), layout="constrained")
    axes = fig.subplots(1, len(SIGNS))
    grid = torch.linspace(-4, 4, 161)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    drawn = styles(results.labels)
    for k, (ax, sign, optimum) in enumerate(zip(axes, SIGNS, OPTIMA)):
        values = toy_values(points, sign).view(xx.shape)
        ax.contour(xx, yy, values, levels=20, cmap="Greys", linewidths=0.6, alpha=0.7)
        ax.scatter(*optimum, marker="*", s=260, color="white", edgecolors="black", zorder=5, label="_nolegend_")
        for label, runs in finished.items():
            run = next((r for r in runs if r.seed == seed and r.trace), None)
            if run is None:
                continue
            path = torch.tensor(run.trace)[:, k]
            style = drawn[label]
            ax.plot(path[:, 0], path[:, 1], color=style.color, linestyle=style.linestyle, linewidth=1.8, label=label)
            ax.scatter(path[:1, 0], path[:1, 1], color=style.color, marker="s", s=30, label="_nolegend_")
            ax.scatter(path[-1:, 0], path[-1:, 1], color=style.color, marker=style.marker, s=45, edgecolors="black",
                       linewidths=0.6, label="_nolegend_")
        ax.set(xlim=(-4, 4), ylim=(-4, 4), aspect="equal",
               title=f"{results.task_names[k]}: its output z_{k + 1} (optimum at {optimum})")
    _legend(fig, axes[0], results)
    fig.suptitle(f"toy2d, seed {seed}: each task's output from start (square) to end (outlined)")
    return fig


def figures(results: ComparisonResults) -> dict[str, Figure]:
    """The figures of one problem's results, by file stem."""
    made = {f"{results.problem}_losses": loss_curves(results), f"{results.problem}_pareto": pareto(results)}
    if any(r.trace for r in results.runs) and results.problem == "toy2d":
        made[f"{results.problem}_trajectories"] = trajectories(results)
    return made


def save_plots(results: Sequence[ComparisonResults], out: str | Path, dpi: int = 110) -> list[Path]:
    """Write every figure of every problem as ``out/<problem>_<kind>.png``; returns the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for result in results:
        for stem, fig in figures(result).items():
            paths.append(folder / f"{stem}.png")
            fig.savefig(paths[-1], dpi=dpi)
    return paths
