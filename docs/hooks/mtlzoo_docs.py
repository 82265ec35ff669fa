"""The mkdocs hook that generates the registry-driven parts of the site at build time.

Everything a page says about a strategy is read here from the registry's metadata
(:class:`mtlzoo.StrategyInfo`, the constructor's hyperparameters), never typed into a page:

- ``strategies/index.md`` (the catalogue) and one page per built-in strategy, added to the files
  and to the nav under "Strategy catalogue", so a strategy that lands later appears on its own;
- markers in the hand-written pages, replaced by generated Markdown: ``<!-- mtlzoo:NAME -->``
  with NAME one of :data:`MARKERS` (the strategy count, the properties table, the comparison
  results and benchmark tables read from the data committed under ``docs/``);
- maths (``$...$``, ``$$...$$``, and the docstrings' ``.. math::`` blocks through
  ``griffe_rst.py``) rendered to MathML at build time with latex2mathml: no JavaScript, no CDN.

The catalogue lists the built-in strategies (those of the registry whose origin is built-in: what
it holds with third-party autoload off), so the site does not depend on which plugins the machine
that builds it has installed.
"""

from __future__ import annotations

import html
import inspect
import json
import logging
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mtlzoo
from mtlzoo.harness.problems import get_problem
from mtlzoo.registry import StrategyEntry
from mtlzoo.strategy import COSTS, PROPERTIES, REQUIRED

log = logging.getLogger("mkdocs.hooks.mtlzoo_docs")

DOCS = Path(__file__).resolve().parent.parent
RESULTS = DOCS / "comparison" / "results.json"
"""What ``python docs/make_figures.py`` writes: the output of ``mtlzoo compare``."""
BENCH = DOCS / "performance" / "bench.json"
"""What ``python docs/make_figures.py`` writes: the output of ``mtlzoo bench``."""
REFERENCE = DOCS / "performance" / "reference.json"
"""The output of ``python benchmarks/vs_reference.py`` (``python docs/make_figures.py`` writes it)."""
GROWTH = DOCS / "performance" / "growth.json"
"""The output of ``python benchmarks/vs_reference.py --growth`` (idem, with its plots ``growth_*.png``)."""
CATALOGUE = "strategies/index.md"
CATALOGUE_TITLE = "Strategy catalogue"

KIND_LABELS = {
    "losses": "loss weighting",
    "representation": "surgery on the representation",
    "parameters": "surgery on the parameters",
}
GROUPS = (("Loss weighting", "losses"), ("Surgery on the representation", "representation"),
          ("Surgery on the parameters", "parameters"))


# ============================================================================ the metadata
def builtin_entries() -> list[StrategyEntry]:
    """The built-in strategies, as the registry lists them (natural order)."""
    return [entry for entry in mtlzoo.list_strategies() if entry.origin.builtin]


def group_of(entry: StrategyEntry) -> str:
    """``"losses"`` for every weighting (GradNorm reads norms, yet weights losses), else where surgery works."""
    return "losses" if entry.info.kind == "weighting" else entry.info.request.where


def kind_label(entry: StrategyEntry) -> str:
    return KIND_LABELS[group_of(entry)]


def cost_of(entry: StrategyEntry) -> tuple[str, bool]:
    """The cost class, and whether it was derived from the request (the strategy does not state it)."""
    info = entry.info
    if info.cost is not None:
        return info.cost, False
    request = info.request
    if request.where == "parameters":
        return ("layer" if request.parameters is not None else "parameters"), True
    return ("representation" if request.where == "representation" else "backward"), True


def cost_cell(entry: StrategyEntry) -> str:
    cost, derived = cost_of(entry)
    return f"`{cost}`" + ("\\*" if derived else "")


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def code_cell(entry: StrategyEntry) -> str:
    url = entry.info.original_code
    if url is None:
        return "?"
    return f"[yes]({url})" if url else "no"


def paper_cell(entry: StrategyEntry, *, title: bool = False) -> str:
    paper = entry.info.paper
    if paper is None:
        return "baseline, no paper"
    text = f"[{paper.citation()}]({paper.url})"
    return text + (f": *{paper.title}*" if title else "")


def strategy_link(entry: StrategyEntry, prefix: str = "") -> str:
    return f"[`{entry.name}`]({prefix}{entry.name}.md)"


def default_repr(value: Any) -> str:
    if value is REQUIRED:
        return "**required**"
    return f"`{value!r}`".replace("|", "\\|")


def class_path(entry: StrategyEntry) -> str:
    return f"{entry.cls.__module__}.{entry.cls.__qualname__}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ============================================================================ generated pages
def catalogue_page(entries: list[StrategyEntry]) -> str:
    """``strategies/index.md``: every built-in strategy, grouped by kind, each row linking to its page."""
    parts = [
        "---\nhide:\n  - toc\n---\n",
        f"# {CATALOGUE_TITLE}\n",
        f"mtlzoo ships **{len(entries)} strategies**. This page and the pages it links to are generated "
        "from the registry's metadata when the site is built (`StrategyInfo` and the constructors' "
        "hyperparameters), so a strategy that lands later appears here without editing a page. "
        "`mtlzoo list` shows the same, plus the strategies that installed plugins add.\n",
        "The *cost class* says what one step computes besides the forward "
        "([concepts](../concepts.md#what-a-step-costs)); a value marked \\* is derived from what the "
        "strategy requests, because its metadata does not state one. The "
        "[comparison guide](../comparison.md) puts the properties side by side.\n",
    ]
    for title, group in GROUPS:
        chosen = [entry for entry in entries if group_of(entry) == group]
        if not chosen:
            continue
        parts.append(f"## {title}\n")
        rows = [[strategy_link(e), e.info.summary, f"`{e.info.needs}`", cost_cell(e), paper_cell(e)]
                for e in chosen]
        parts.append(_table(["strategy", "what it does", "needs", "cost", "paper"], rows))
    return "\n".join(parts)


def argument_descriptions(cls: type) -> dict[str, str]:
    """What the ``Args:`` sections of ``cls``'s docstring, and of its bases' and composed parts' (a composite's
    ``adapter: Rotations``; Google style), say of each argument."""
    found: dict[str, str] = {}
    roles = getattr(cls, "composes", ())
    hints = typing.get_type_hints(cls) if roles else {}
    parts = [hints[role] for role in roles if isinstance(hints.get(role), type)]
    for klass in [*parts, *reversed(cls.__mro__)]:
        found.update(_docstring_args(klass.__dict__.get("__doc__")))
    return found


def _docstring_args(doc: str | None) -> dict[str, str]:
    args: dict[str, str] = {}
    current: str | None = None
    inside = False
    for line in inspect.cleandoc(doc or "").splitlines():
        if re.fullmatch(r"Args:\s*", line):
            inside, current = True, None
        elif inside and not line.startswith(" ") and line.strip():
            inside = False
        elif inside and (match := re.fullmatch(r" {4}(\w+)(?: \([^)]*\))?:\s*(.*)", line)):
            current = match.group(1)
            args[current] = match.group(2)
        elif inside and current and line.startswith(" " * 8):
            args[current] += " " + line.strip()
    return args


def strategy_page(entry: StrategyEntry) -> str:
    """One strategy: its metadata, hyperparameters and defaults, a usage line, its docstring (the formula)."""
    info = entry.info
    cost, derived = cost_of(entry)
    claims = ", ".join(name.replace("_", " ") for name in sorted(info.properties)) or "none claimed"
    optimizer = (f"`{info.optimizer}`, lr `{info.lr:g}`" if info.optimizer and info.lr is not None
                 else f"`{info.optimizer}`" if info.optimizer else "none (nothing to train)"
                 if not info.learnable else "not stated")
    rows = [
        ["Kind", kind_label(entry)],
        ["Aliases", ", ".join(f"`{a}`" for a in info.aliases) or "none"],
        ["Needs from a step", f"`{info.needs}`"],
        ["Cost class", f"`{cost}`: {COSTS[cost]}" + (" (derived from the request: not stated)" if derived else "")],
        ["Paper", paper_cell(entry, title=True)],
        ["Original code", {"?": "not stated", "no": "none"}.get(code_cell(entry), code_cell(entry))],
        ["Stochastic", yes_no(info.stochastic)],
        ["Learnable parameters", yes_no(info.learnable)
         + (" (put `mtl.strategy_parameters()` in an optimizer)" if info.learnable else "")],
        ["Transforms the representation", yes_no(info.adapts_representation)],
        ["Claimed properties", claims],
        ["Its own optimizer in `mtlzoo compare`", optimizer],
        ["In the default comparison", yes_no(info.default_comparison)],
    ]
    hparams = entry.hyperparameters
    described = {name: text.replace("|", "\\|") for name, text in argument_descriptions(entry.cls).items()}
    required = {name: "..." for name, default in hparams.items() if default is REQUIRED}
    call = "".join(f", {name}=..." for name in required)
    parts = [
        f"# `{entry.name}`\n",
        f"{info.summary}\n",
        _table(["metadata", "value"], rows),
        "## Hyperparameters\n",
        ("The constructor's keyword arguments; `num_tasks` is supplied by `MTLWrapper`.\n\n"
         + _table(["name", "default", "what it does"], [[f"`{n}`", default_repr(d) + (
             f" (`mtlzoo compare` and `mtlzoo bench` use {default_repr(info.suggested[n])})"
             if n in info.suggested else ""), described.get(n, "")] for n, d in hparams.items()]))
        if hparams else "None besides `num_tasks`, which `MTLWrapper` supplies.\n",
        "## Use it\n",
        "```py\n"
        f'mtl = mtlzoo.MTLWrapper(model, strategy="{entry.name}"{call})\n'
        f'strategy = mtlzoo.create("{entry.name}", num_tasks=K{call})   # standalone, on tensors\n'
        "```\n",
        "## Definition\n",
        f"::: {class_path(entry)}\n"
        "    options:\n"
        "      show_root_heading: false\n"
        "      show_root_toc_entry: false\n"
        "      members: false\n"
        "      show_bases: true\n",
    ]
    return "\n".join(parts)


def properties_table(entries: list[StrategyEntry]) -> str:
    """Strategies x properties, each cell a field of ``StrategyInfo``."""
    rows = [[strategy_link(e, "strategies/"), kind_label(e), f"`{e.info.needs}`", cost_cell(e),
             yes_no(e.info.stochastic), yes_no(e.info.learnable), code_cell(e),
             ", ".join(p.replace("_", " ") for p in sorted(e.info.properties)) or "—"] for e in entries]
    return _table(["strategy", "kind", "needs", "cost class", "stochastic", "learnable parameters",
                   "original code", "claimed properties"], rows)


def cost_classes() -> str:
    """The cost classes of :data:`mtlzoo.strategy.COSTS`, as a list."""
    return "\n".join(f"- `{name}`: {text}." for name, text in COSTS.items()) + "\n"


def properties_legend() -> str:
    costs = cost_classes()
    claims = "\n".join(f"- *{name.replace('_', ' ')}*: {text}." for name, text in PROPERTIES.items())
    return (f"Cost classes (`StrategyInfo.cost`; \\* derived from the request where a strategy does not state it):\n\n"
            f"{costs}\n\nOriginal code (`StrategyInfo.original_code`): *yes* links the authors' repository, *no* "
            f"means none was published, *?* that the metadata does not say yet.\n\n"
            f"Claimed properties (`StrategyInfo.properties`; the test suite checks every claim):\n\n{claims}\n")


# ============================================================================ committed data
def _fmt(value: Any, std: Any = None, digits: int = 3) -> str:
    """``mean ± std`` (the std only where given and finite: one seed has none)."""
    if value is None:
        return "—"
    text = f"{value:.{digits}g}"
    return text + (f" ± {std:.2g}" if isinstance(std, (int, float)) and std == std else "")


def load_results(path: Path = RESULTS) -> list[dict[str, Any]]:
    """The problems of the committed ``results.json`` (``mtlzoo compare --out``), or ``[]`` if absent."""
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["problems"])


def results_strategies(path: Path = RESULTS) -> dict[str, set[str]]:
    """Per problem, the strategies with a row in the committed results."""
    return {problem["problem"]: {row["strategy"] for row in problem["summary"]} for problem in load_results(path)}


def results_section(problem: dict[str, Any]) -> str:
    """One problem's table (mean ± std over seeds) and its plots."""
    name = problem["problem"]
    metrics = {metric["name"]: metric for metric in problem["metrics"]}
    tasks = problem["task_names"]
    # each task's primary metric (results written before per-task metrics: the first metric for every task)
    primaries = {task: metrics[(problem.get("task_metrics") or {}).get(task, [problem["metrics"][0]["name"]])[0]]
                 for task in tasks}
    primary = primaries[tasks[0]]
    shared = len({metric["name"] for metric in primaries.values()}) == 1
    seeds = problem.get("seeds") or []

    def arrow(metric: dict[str, Any]) -> str:
        return "↑" if metric["higher_is_better"] else "↓"

    header = ["strategy"] + [f"{task} {primaries[task]['name']} {arrow(primaries[task])}" for task in tasks]
    if shared:
        header.append(f"worst task {arrow(primary)}")
    if problem.get("delta_m"):
        header.append(f"Δm% vs {problem.get('reference', 'ls')} ↓")
    header += ["mean rank ↓", "time / `ls` step", "steps with a conflict"]
    rows = []
    failures = []
    for row in problem["summary"]:
        if row.get("ok", 0) == 0:
            error = str(row.get("error"))
            kind = error.split(":", 1)[0] if re.match(r"^[A-Za-z]+(Error|Exception):", error) else "error"
            rows.append([f"`{row['strategy']}`", f"failed (`{kind}`, below)"] + ["—"] * (len(header) - 2))
            failures.append(f"- `{row['strategy']}`: {html.escape(error)}")
            continue
        cells = [f"`{row['strategy']}`"]
        def cell(key: str, digits: int = 3, row: dict[str, Any] = row) -> str:
            return _fmt(row.get(key), row.get(f"{key}_std") if len(seeds) > 1 else None, digits)

        cells += [cell(f"{task}/{primaries[task]['name']}") for task in tasks]
        if shared:
            cells.append(cell("worst"))
        if problem.get("delta_m"):
            cells.append(cell("delta_m"))
        cells.append(cell("rank", 2))
        ratio = row.get("time_ratio")
        cells.append("—" if ratio is None else f"{ratio:.2g}x")
        share = row.get("conflict_share")
        cells.append("—" if share is None else f"{100 * share:.0f}%")
        rows.append(cells)
    what = get_problem(name) if _has_problem(name) else None
    parts = [f"### `{name}`\n"]
    if what is not None:
        source = f" Source: {what.cls.source}." if what.cls.source else ""
        parts.append(f"{what.cls.summary.rstrip('.')}.{source}\n")
    described = []
    for metric in {m["name"]: m for m in primaries.values()}.values():
        direction = "higher is better" if metric["higher_is_better"] else "lower is better"
        described.append(f"*{metric['name']}* ({metric.get('description') or direction}, {direction})")
    parts.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
                 f"{problem.get('steps')} steps each; primary metric{'s' if len(described) > 1 else ''} "
                 f"{' and '.join(described)}; mean ± standard deviation over seeds.\n")
    parts.append(_table(header, rows))
    if failures:
        parts.append("Runs recorded as failed (the harness records the error and goes on):\n\n"
                     + "\n".join(failures) + "\n")
    if what is not None and what.cls.literature:
        parts.append(f"!!! note \"What the literature reports\"\n    {what.cls.literature.rstrip('.')}.\n")
    for suffix, caption in (("trajectories", "Trajectories of each task's output (seed 0)"),
                            ("losses", "Training loss per task"),
                            ("pareto", "Final test metric of each task: one point per strategy and seed")):
        image = DOCS / "comparison" / f"{name}_{suffix}.png"
        if image.exists():
            parts.append(f"![{caption} on {name}](comparison/{image.name})\n/// caption\n{caption}.\n///\n")
    return "\n".join(parts)


def _has_problem(name: str) -> bool:
    try:
        get_problem(name)
    except Exception:  # a problem that is no longer registered: its committed table still shows
        return False
    return True


def results_tables(path: Path = RESULTS) -> str:
    problems = load_results(path)
    if not problems:
        return ("!!! warning \"No committed results\"\n    `docs/comparison/results.json` is missing: run "
                "`python docs/make_figures.py`.\n")
    return "\n".join(results_section(problem) for problem in problems)


def bench_table(path: Path = BENCH) -> str:
    """The committed ``mtlzoo bench`` JSON (``settings``, ``environment``, ``results``) as one table per model."""
    if not path.exists():
        return ("!!! warning \"No committed figures\"\n    `docs/performance/bench.json` is missing: run "
                "`python docs/make_figures.py`.\n")
    data = json.loads(path.read_text())
    settings, environment = data.get("settings", {}), data.get("environment", {})
    parts = [f"K = {settings.get('tasks')} tasks, d = {settings.get('dim')}, median of {settings.get('steps')} "
             f"timed steps after {settings.get('warmup')} warm-up steps, on `{environment.get('device')}` "
             f"with torch {environment.get('torch')} and {environment.get('threads')} threads.\n"]
    models: dict[str, list[dict[str, Any]]] = {}
    for row in data.get("results", []):
        models.setdefault(str(row.get("model")), []).append(row)
    for model, rows in models.items():
        table_rows = []
        for row in rows:
            if row.get("status") != "ok":
                table_rows.append([f"`{row.get('strategy')}`", "—", "—", "—",
                                   "failed: " + html.escape(str(row.get("error"))).replace("|", "\\|")])
                continue
            table_rows.append([f"`{row.get('strategy')}`", f"{1000 * row['median_s']:.2f} ms",
                               f"{1000 * row['p25_s']:.2f} – {1000 * row['p75_s']:.2f} ms",
                               f"**{row['ratio_to_ls']:.2f}x**", ""])
        parts.append(f"### {model}\n")
        parts.append(_table(["strategy", "median step", "quartiles", "ratio to `ls`", "note"], table_rows))
    return "\n".join(parts)


def _suite_tables(path: Path, render: Callable[[dict[str, Any]], list[tuple[str, list[str], list[list[str]]]]]) -> str:
    """A committed ``benchmarks/vs_reference.py`` (``--growth``) JSON as Markdown tables (the script's own rows)."""
    if not path.exists():
        return (f"!!! warning \"No committed figures\"\n    `docs/performance/{path.name}` is missing: run "
                "`python docs/make_figures.py --skip-compare`.\n")
    data = json.loads(path.read_text())
    environment = data.get("environment", {})
    packages = ", ".join(f"{name} {environment.get(name) or 'not installed'}" for name in ("rotograd", "torchjd"))
    settings = data.get("settings", {})
    clock = "this thread's CPU time" if settings.get("clock") == "cpu" else "wall-clock time"
    parts = [f"Measured with torch {environment.get('torch')} on {environment.get('threads')} CPU threads, "
             f"at most {settings.get('steps')} interleaved steps per configuration; {packages}. "
             f"Ratios: the median [quartiles] of each step's {clock} over the plain step's of the same "
             "iteration.\n"]
    for title, header, rows in render(data):
        parts.append(f"**{html.escape(title)}**\n")
        parts.append(_table(header, [[html.escape(cell).replace("|", "\\|") for cell in row] for row in rows]))
    return "\n".join(parts)


def vs_reference() -> Any:
    """``benchmarks/vs_reference.py`` (at the repository's root, not installed), imported from its file."""
    import importlib.util
    import sys

    name = "benchmarks.vs_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS.parent / "benchmarks" / "vs_reference.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while it is executed
        spec.loader.exec_module(module)
    return sys.modules[name]


def reference_tables(path: Path = REFERENCE) -> str:
    return _suite_tables(path, vs_reference().report_rows)


def growth_tables(path: Path = GROWTH) -> str:
    return _suite_tables(path, vs_reference().growth_rows)


def strategy_count(entries: list[StrategyEntry]) -> str:
    return str(len(entries))


MARKERS: dict[str, Callable[[], str]] = {
    "strategy-count": lambda: strategy_count(builtin_entries()),
    "properties-table": lambda: properties_table(builtin_entries()),
    "properties-legend": properties_legend,
    "cost-classes": cost_classes,
    "comparison-results": results_tables,
    "bench-table": bench_table,
    "reference-tables": reference_tables,
    "growth-tables": growth_tables,
}
MARKER = re.compile(r"<!-- mtlzoo:([a-z-]+) -->")


def fill_markers(markdown: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in MARKERS:
            raise ValueError(f"Unknown docs marker {name!r}; known: {sorted(MARKERS)}.")
        return MARKERS[name]().rstrip("\n")

    return MARKER.sub(replace, markdown)


# ============================================================================ maths
MATH = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.DOTALL)


def math_to_mathml(page_html: str) -> str:
    """Replace pymdownx.arithmatex's generic output (``\\(x\\)``, ``\\[x\\]``) by MathML."""
    from latex2mathml.converter import convert

    def replace(match: re.Match[str]) -> str:
        tag, text = match.group(1), html.unescape(match.group(2)).strip()
        display = "block" if tag == "div" else "inline"
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if text.startswith(left) and text.endswith(right):
                text = text[len(left):-len(right)].strip()
        try:
            mathml = convert(text, display=display)
        except Exception as error:  # shown as TeX source, and said
            log.warning("latex2mathml could not convert %r: %s", text, error)
            return f"<code>{html.escape(text)}</code>"
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return MATH.sub(replace, page_html)


# ============================================================================ mkdocs events
def _nav_catalogue(entries: list[StrategyEntry]) -> list[Any]:
    section: list[Any] = [CATALOGUE]
    for title, group in GROUPS:
        pages = [{entry.name: f"strategies/{entry.name}.md"} for entry in entries if group_of(entry) == group]
        if pages:
            section.append({title: pages})
    return section


def on_config(config: Any) -> Any:
    """Expand the nav's "Strategy catalogue" entry into the catalogue and one page per strategy."""
    entries = builtin_entries()
    nav = config["nav"] or []
    for index, item in enumerate(nav):
        if isinstance(item, dict) and item.get(CATALOGUE_TITLE) == CATALOGUE:
            nav[index] = {CATALOGUE_TITLE: _nav_catalogue(entries)}
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    entries = builtin_entries()
    files.append(File.generated(config, CATALOGUE, content=catalogue_page(entries)))
    for entry in entries:
        files.append(File.generated(config, f"strategies/{entry.name}.md", content=strategy_page(entry)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return fill_markers(markdown)


def on_page_content(page_html: str, page: Any, config: Any, files: Any) -> str:
    return math_to_mathml(page_html)
