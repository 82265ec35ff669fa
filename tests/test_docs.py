"""The documentation site: generated from the registry, its committed results complete, its examples run.

``python -m mkdocs build --strict`` (in CI after the tests) checks links and references; these
tests check what a strict build cannot: that every built-in strategy is in the catalogue and the
properties table, that the committed comparison covers the default comparison, and that the code
of the pages runs (executed by mktestdocs).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import mtlzoo
from mtlzoo.registry import DISABLE_AUTOLOAD_ENV, StrategyRegistry
from mtlzoo.strategy import COSTS, StrategyInfo

mktestdocs = pytest.importorskip("mktestdocs", reason="the docs extra: python -m pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXECUTED_PAGES = ["index.md", "getting-started.md", "concepts.md", "composition.md", "plugins.md", "rotograd.md"]


def load_hook(name: str) -> ModuleType:
    path = DOCS / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    return load_hook("mtlzoo_docs")


@pytest.fixture
def builtin_names(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The built-in strategies: a fresh registry with third-party autoload off."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    names = [entry.name for entry in StrategyRegistry().list()]
    assert "ls" in names and "rotograd" in names
    return names


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Rows of the Markdown tables whose first cell links a strategy page, by strategy name."""
    rows = {}
    for line in markdown.splitlines():
        match = re.match(r"\| \[`([a-z0-9_]+)`\]\((?:strategies/)?\1\.md\) \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


# ----------------------------------------------------------------------------- generated pages
def test_every_builtin_strategy_has_a_catalogue_row_a_page_and_a_nav_entry(hook: ModuleType,
                                                                         builtin_names: list[str]) -> None:
    """Against the registry with autoload off: one catalogue row, one generated page, one nav entry each."""
    entries = hook.builtin_entries()
    assert sorted(e.name for e in entries) == sorted(builtin_names)
    catalogue = hook.catalogue_page(entries)
    assert set(table_rows(catalogue)) == set(builtin_names)
    assert f"**{len(builtin_names)} strategies**" in catalogue

    from mkdocs.config import load_config
    from mkdocs.structure.files import get_files

    config = load_config(str(ROOT / "mkdocs.yml"))  # mkdocs's own events, as a build runs them: the hook is wired
    config = config.plugins.on_config(config)
    files = config.plugins.on_files(get_files(config), config=config)
    nav = json.dumps(config["nav"])
    for name in builtin_names:
        assert f'"strategies/{name}.md"' in nav, name
        page = files.get_file_from_path(f"strategies/{name}.md").content_string
        entry = mtlzoo.get_strategy(name)
        assert f"::: {entry.cls.__module__}.{entry.cls.__qualname__}" in page  # the docstring: the formula
        assert entry.info.summary in page
        described = hook.argument_descriptions(entry.cls)
        for hyperparameter in entry.hyperparameters:
            assert f"| `{hyperparameter}` |" in page, (name, hyperparameter)
            assert described.get(hyperparameter), f"{name}'s docstring says nothing of {hyperparameter!r} (Args:)"
            assert described[hyperparameter].replace("|", "\\|") in page, (name, hyperparameter)
    assert set(table_rows(files.get_file_from_path("strategies/index.md").content_string)) == set(builtin_names)


def test_every_builtin_strategy_is_a_row_of_the_properties_table(hook: ModuleType, builtin_names: list[str]) -> None:
    """Against the registry with autoload off and each strategy's StrategyInfo: one full row each."""
    page = (DOCS / "comparison.md").read_text()
    assert "<!-- mtlzoo:properties-table -->" in page
    rows = table_rows(hook.fill_markers(page))
    assert set(rows) == set(builtin_names)
    for name in builtin_names:
        info = mtlzoo.get_strategy(name).info
        kind, needs, cost, stochastic, learnable, code, _claims = rows[name]
        assert needs == f"`{info.needs}`"
        assert cost.rstrip("\\*").strip("`") in COSTS
        assert cost.endswith("\\*") == (info.cost is None)  # a derived class is marked
        assert stochastic == ("yes" if info.stochastic else "no")
        assert learnable == ("yes" if info.learnable else "no")
        assert code == ("?" if info.original_code is None else f"[yes]({info.original_code})" if info.original_code
                        else "no")
        assert kind.startswith("loss weighting") == (info.kind == "weighting")


def test_cost_classes_are_checked_and_derived_ones_match_the_request(hook: ModuleType) -> None:
    """StrategyInfo refuses a cost class outside COSTS; the docs derive one only where none is stated."""
    with pytest.raises(ValueError, match="cost"):
        StrategyInfo(name="x", kind="weighting", summary="s", cost="cheap")
    with pytest.raises(ValueError, match="original_code"):
        StrategyInfo(name="x", kind="weighting", summary="s", original_code=True)  # type: ignore[arg-type]
    assert hook.cost_of(mtlzoo.get_strategy("rotograd")) == ("representation", False)
    assert hook.cost_of(mtlzoo.get_strategy("ls")) == ("backward", False)
    for entry in hook.builtin_entries():
        cost, derived = hook.cost_of(entry)
        if derived:
            expected = {"losses": "backward", "representation": "representation"}.get(
                entry.info.request.where, "layer" if entry.info.request.parameters else "parameters")
            assert cost == expected, entry.name


# ----------------------------------------------------------------------------- committed results
def test_the_committed_results_cover_the_default_comparison(hook: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every strategy and problem of the default comparison (autoload off) has rows in docs/comparison/results.json.

    Fails after a strategy joins the default set until `python docs/make_figures.py` is rerun.
    """
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    registry = StrategyRegistry()
    default = {"ls"} | {entry.name for entry in registry.list() if entry.info.default_comparison}
    from mtlzoo.compare import default_problems

    committed = hook.results_strategies()
    assert committed, "docs/comparison/results.json is missing: run python docs/make_figures.py"
    for problem in default_problems():
        assert problem in committed, f"{problem} is missing from the committed results"
        missing = default - committed[problem]
        assert not missing, f"{sorted(missing)} missing from the committed results on {problem}"
        assert (DOCS / "comparison" / f"{problem}_losses.png").exists()
    page = hook.results_tables()
    for problem in committed:
        assert f"### `{problem}`" in page
    assert (DOCS / "comparison" / "results.csv").exists() and (DOCS / "performance" / "bench.json").exists()


# ----------------------------------------------------------------------------- maths and docstrings
def test_maths_becomes_mathml_and_rest_becomes_markdown(hook: ModuleType) -> None:
    """Hand-written inputs: arithmatex's generic output to MathML; the docstrings' reST to Markdown."""
    html = ('<p>a <span class="arithmatex">\\(g_k \\cdot d\\)</span></p>'
            '<div class="arithmatex">\\[\nd = \\sum_k c_k g_k\n\\]</div>')
    out = hook.math_to_mathml(html)
    assert "\\(" not in out and "\\[" not in out
    assert out.count("<math") == 2 and 'display="block"' in out
    rst = load_hook("griffe_rst")
    text = ("Update::\n\n    .. math::\n\n        d = \\frac{a}{b}\n\n    See :class:`~mtlzoo.protocol.Request`.\n\n"
            "Example:\n    >>> [1, 2]\n    [1, 2]\n")
    converted = rst.to_markdown(text)
    assert "Update:\n" in converted and "    $$\n    d = \\frac{a}{b}\n    $$\n" in converted
    assert "See `Request`." in converted
    assert "    ```pycon\n    >>> [1, 2]\n    [1, 2]\n    ```" in converted


# ----------------------------------------------------------------------------- the pages' code
@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_the_code_blocks_of_the_page_run(page: str) -> None:
    """Every ```python block of the page, in order, in one namespace (mktestdocs)."""
    before = {entry.name for entry in mtlzoo.list_strategies()}
    mktestdocs.check_md_file(DOCS / page, memory=True)
    assert {entry.name for entry in mtlzoo.list_strategies()} == before  # the page cleaned up after itself


def test_the_plugin_pages_example_registers_names_of_its_own() -> None:
    """The names the plugin page registers are free in the registry (the example package's included)."""
    page = (DOCS / "plugins.md").read_text()
    strategies = re.findall(r'^\s+name="([a-z_]+)",$', page, flags=re.MULTILINE)
    problems = re.findall(r'name: ClassVar\[str\] = "([a-z_0-9]+)"', page)
    assert strategies == ["capped_mean"] and problems == ["sine_pair"]
    from mtlzoo.problems import list_problems

    taken = {n for entry in mtlzoo.list_strategies() for n in (entry.name, *entry.info.aliases)}
    assert not set(strategies) & taken
    assert not set(problems) & {entry.name for entry in list_problems()}
    assert "REGISTRY.unregister_plugin(name)" in page  # and it removes them (checked when the page runs)
