"""The published results on the benchmark pages of the comparison guide: labelled, cited, named by strategy.

Each of docs/comparison/{nyuv2,cityscapes,celeba,qm9}.md quotes the papers' Δm% in a section of
its own. The numbers themselves cannot be tested here (they are copied from the papers); what can
be is that the section says they are the papers' and not mtlzoo's, that every row names a strategy
mtlzoo registers (a typo or a method mtlzoo lacks fails), that every value cell is a number, and
that every citation the page makes has its reference.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtlzoo.registry import DISABLE_AUTOLOAD_ENV, StrategyRegistry

PAGES = Path(__file__).resolve().parent.parent / "docs" / "comparison"
BENCHMARKS = ["nyuv2", "cityscapes", "celeba", "qm9"]
HEADING = "## Published results (for orientation)"
LABEL = '!!! warning "Reported by the papers, not run by mtlzoo"'
VALUE = re.compile(r"^([+-]?\d+(\.\d+)?( ± \d+(\.\d+)?)?( \([a-z]\))?)?$")


def published_section(name: str) -> str:
    text = (PAGES / f"{name}.md").read_text(encoding="utf-8")
    assert HEADING in text, f"{name}.md has no '{HEADING}' section"
    section = text.split(HEADING, 1)[1]
    return section.split("\n## ", 1)[0]


def tables(section: str) -> list[list[list[str]]]:
    """The section's Markdown tables: for each, its body rows as lists of stripped cells."""
    found: list[list[list[str]]] = []
    previous_was_table = False
    for line in section.splitlines():
        is_table = line.startswith("|")
        if is_table and not previous_was_table:
            found.append([])
        if line.startswith("| `"):
            found[-1].append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous_was_table = is_table
    return found


@pytest.fixture(scope="module")
def builtin_names() -> set[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DISABLE_AUTOLOAD_ENV, "1")
        return {entry.name for entry in StrategyRegistry().list()}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_published_results_are_labelled_as_the_papers(name: str) -> None:
    prose = " ".join(published_section(name).split())
    assert LABEL in prose
    assert "not comparable with each other" in prose
    assert "lower is better" in prose


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_row_names_a_registered_strategy_once_and_holds_numbers(name: str, builtin_names: set[str]) -> None:
    found = tables(published_section(name))
    assert found and all(len(rows) >= 10 for rows in found), f"{name}.md: a published table is missing or short"
    for rows in found:
        named = [cells[0].strip("`") for cells in rows]
        assert len(named) == len(set(named)), f"{name}.md: a method has two rows in one table"
        for strategy, cells in zip(named, rows):
            assert strategy in builtin_names, f"{name}.md: `{strategy}` is not a registered strategy"
            for value in cells[2:]:
                assert VALUE.match(value), f"{name}.md, row `{strategy}`: {value!r} is not a number"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_citation_has_its_reference(name: str) -> None:
    text = (PAGES / f"{name}.md").read_text(encoding="utf-8")
    defined = set(re.findall(r"^\[\^(\w+)\]:", text, flags=re.M))
    cited = set(re.findall(r"\[\^(\w+)\](?!:)", text))
    assert cited <= defined, f"{name}.md cites {sorted(cited - defined)} without a reference"
    assert defined <= cited, f"{name}.md has references never cited: {sorted(defined - cited)}"
