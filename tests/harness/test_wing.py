"""The harness is a wing of its own (issue 18, item 6): facts any reader can check from the source.

- no import circle anywhere in ``mtlzoo/`` (every import counts, a function's too; ``TYPE_CHECKING``
  blocks aside);
- the library (wrapper, strategies, engine, registry) never imports the harness; only the command
  and the two modules kept under the harness's former names do;
- no module anywhere in ``mtlzoo/`` over 500 lines (one concept per module), and no harness module
  names a strategy to give it defaults: those are the strategies' own (``StrategyInfo.suggested``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mtlzoo
from mtlzoo.harness import plan
from mtlzoo.harness.problems import GradNormSynthetic, Toy2D
from mtlzoo.strategy import REQUIRED, StrategyInfo

PACKAGE = Path(mtlzoo.__file__).parent
ENTRY_POINTS_OF_THE_HARNESS = {"mtlzoo.cli", "mtlzoo.compare", "mtlzoo.problems"}
"""The command, and the names the harness had before it was a wing (re-exports)."""


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
        imported: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def test_no_import_circle_in_the_package() -> None:
    graph = _imports()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in visiting:
            pytest.fail(f"import circle: {' -> '.join([*visiting[visiting.index(name):], name])}")
        if name in done:
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_library_never_imports_the_harness() -> None:
    offenders = {name: sorted(other for other in imported if other.startswith("mtlzoo.harness"))
                 for name, imported in _imports().items()
                 if not name.startswith("mtlzoo.harness") and name not in ENTRY_POINTS_OF_THE_HARNESS}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_of_the_package_is_over_500_lines() -> None:
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert len(lengths) > 50 and lengths["engine/step.py"] > 100  # the walk reads the package's modules
    assert {path: lines for path, lines in lengths.items() if lines > 500} == {}


def test_harness_modules_name_no_strategy_for_defaults() -> None:
    for path in (PACKAGE / "harness").rglob("*.py"):
        text = path.read_text()
        assert "GRADNORM_STRATEGIES" not in text and '"gradnorm"' not in text, path


@pytest.mark.parametrize("name", [entry.name for entry in mtlzoo.list_strategies()])
def test_every_strategy_constructs_by_name_alone_with_its_suggestions(name: str) -> None:
    """Registry-wide: a hyperparameter without a default has a suggested value in the metadata, and the
    suggestions are hyperparameters the strategy takes."""
    entry = mtlzoo.get_strategy(name)
    required = {key for key, default in entry.hyperparameters.items() if default is REQUIRED}
    assert required <= set(entry.info.suggested), f"{name}: suggest a value for {sorted(required)}"
    assert set(entry.info.suggested) <= set(entry.hyperparameters)
    assert mtlzoo.create(name, num_tasks=3, **entry.info.suggested).num_tasks == 3


def test_suggestions_reach_the_harness_under_the_problems_and_the_runs_values() -> None:
    """GradNorm's suggested alpha (1.5) is the harness's default; the GradNorm paper's problem uses its 0.12;
    a run's own value wins."""
    assert mtlzoo.get_strategy("gradnorm").info.suggested == {"alpha": 1.5}
    assert plan(Toy2D(), "gradnorm").options == {"alpha": 1.5}
    assert plan(Toy2D(), "rotograd_norm").options["alpha"] == 1.5
    assert plan(GradNormSynthetic(), "gradnorm").options == {"alpha": 0.12}
    assert plan(Toy2D(), "gradnorm:alpha=0.5").options == {"alpha": 0.5}


def test_suggested_is_a_frozen_mapping_of_names() -> None:
    info = StrategyInfo(name="x", kind="weighting", summary="s", suggested={"alpha": 1.0})
    with pytest.raises(TypeError):
        info.suggested["alpha"] = 2.0  # type: ignore[index]
    assert StrategyInfo(name="x", kind="weighting", summary="s").suggested == {}
    with pytest.raises(ValueError, match="`suggested`"):
        StrategyInfo(name="x", kind="weighting", summary="s", suggested=[("alpha", 1.0)])  # type: ignore[arg-type]
