"""Tables for the terminal: a comparison's results (rich), readable at 80 to 100 columns, and plain text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtlzoo.harness.results import ComparisonResults

MANY_TASKS = 12
"""Above this many tasks (CelebA's 40), the table shows each metric's mean over the tasks; the files keep each task."""


def plain_table(header: list[str], rows: list[list[str]], *, right: Sequence[int] = ()) -> str:
    """``rows`` under ``header`` in aligned plain-text columns, a rule under the header; the columns whose
    indices are in ``right`` right-aligned (numbers), the others left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def fmt(mean: float | None, std: float | None = None, digits: int = 3) -> str:
    """``mean`` to ``digits`` significant digits, ``±std`` to one; ``-`` for none."""
    if mean is None:
        return "-"
    text = f"{mean:.{digits}g}" if abs(mean) >= 1e-3 or mean == 0 else f"{mean:.1e}"
    return text if not std else f"{text}±{std:.1g}"


def _arrow(metric: dict[str, Any]) -> str:
    return "↑" if metric["higher_is_better"] else "↓"


def result_columns(results: ComparisonResults) -> list[tuple[str, list[str]]]:
    """The columns after ``strategy``: (header, one cell per strategy of :meth:`ComparisonResults.summary`)."""
    rows = results.summary()

    def cells(key: str) -> list[str]:
        return [fmt(row[key], row[key + "_std"]) for row in rows]

    many = len(results.task_names) > MANY_TASKS and results.shared_metrics()
    columns = [(f"{task} {metric['name']} {_arrow(metric)}", cells(f"{task}/{metric['name']}"))
               for task, metric in ([] if many else results.columns())]
    columns += [(f"mean {name} ({len(results.task_names)} tasks) {_arrow(results.metric(name))}", cells(f"mean/{name}"))
                for name in many or []]
    if results.shared_primary:
        columns.append((f"worst {_arrow(results.primary)}", cells("worst")))
    if results.delta_m:
        columns.append((f"Δm% vs {results.reference} ↓", cells("delta_m")))
    columns.append(("rank ↓", [fmt(row["rank"], None, 2) for row in rows]))
    columns.append(("ms/step", [fmt(None if row["seconds_per_step"] is None else 1000 * row["seconds_per_step"])
                                for row in rows]))
    columns.append(("x ls", [fmt(row["time_ratio"], None, 2) for row in rows]))
    columns.append(("conflict", ["-" if row["conflict_share"] is None else f"{100 * row['conflict_share']:.0f}%"
                                 for row in rows]))
    columns.append(("runs", [f"{row['ok']}/{row['runs']}" if row["ok"] == row["runs"]
                             else f"[red]{row['ok']}/{row['runs']} failed[/red]" for row in rows]))
    return columns


def _content_width(cells: list[str]) -> int:
    return max(len(cell.replace("[red]", "").replace("[/red]", "")) for cell in cells)


def _table(results: ComparisonResults, labels: list[str], group: list[tuple[str, list[str]]], part: str) -> Any:
    from rich.table import Table

    table = Table(title=f"{results.problem}: {results.steps} steps x {len(results.seeds)} seeds "
                        f"(mean ± std over seeds){part}", title_justify="left")
    table.add_column("strategy", style="bold", no_wrap=True, min_width=_content_width(["strategy", *labels]))
    for header, cells in group:
        table.add_column(header, justify="right", overflow="fold", min_width=_content_width(cells))
    for k, label in enumerate(labels):
        table.add_row(label, *[cells[k] for _, cells in group])
    return table


def result_tables(results: ComparisonResults, width: int = 100) -> list[Any]:
    """The summary as rich tables no wider than ``width`` columns: a table too wide is split between columns (each
    part repeats the strategy column), never cut (rich would shorten ``0.912`` to ``0.9…`` in a table too wide)."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=10_000)
    labels = [row["strategy"] for row in results.summary()]
    groups: list[list[tuple[str, list[str]]]] = [[]]
    for column in result_columns(results):
        candidate = [*groups[-1], column]
        natural = Measurement.get(console, console.options, _table(results, labels, candidate, "")).maximum
        if groups[-1] and natural > width:
            groups.append([column])
        else:
            groups[-1] = candidate
    return [_table(results, labels, group, "" if len(groups) == 1 else f" ({i + 1}/{len(groups)})")
            for i, group in enumerate(groups)]


def notes(results: ComparisonResults, literature: tuple[str, str] | None = None) -> str:
    """What to read beside the tables: the literature on the problem (``(source, text)``, omitted when
    empty), each failed strategy's error, and what two columns mean."""
    lines = []
    if literature is not None and literature[1].strip():
        source, text = literature
        about = f" ({source})" if source.strip() else ""
        lines.append(f"  The literature on {results.problem}{about}: {text.strip().rstrip('.')}.")
    for row in results.summary():
        if row["error"]:
            error = row["error"] if len(row["error"]) <= 800 else row["error"][:797] + "..."
            lines.append(f"  {row['strategy']} failed: {error}")
    lines.append("  conflict: share of measurements (every few steps) in which two task gradients on the shared "
                 "representation have a negative cosine; x ls: time per step over ls's, same comparison.")
    return "\n".join(lines)
