"""The generic name registry under the strategy and problem registries (names, aliases, listing, errors)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mtlzoo.errors import DuplicateNameError, DuplicateStrategyError, UnknownProblemError
from mtlzoo.names import NameRegistry
from mtlzoo.plugins import Origin


@dataclass(frozen=True)
class Item:
    cls: type
    origin: Origin
    name: str


class First:
    pass


class Second:
    pass


def _registry() -> NameRegistry[Item]:
    names: NameRegistry[Item] = NameRegistry("problem", UnknownProblemError, see_also=lambda n: f"All: {sorted(n)}.")
    names.add(Item(First, Origin("a", builtin=True), "Toy-2D"), aliases=("first",))
    names.add(Item(Second, Origin("b", "dist-b", "1.0"), "gradnorm_synthetic"))
    return names


def test_names_are_case_insensitive_with_dash_as_underscore_and_aliases() -> None:
    names = _registry()
    assert names.get("TOY_2d").cls is First and names.get("First").cls is First
    assert "gradnorm-synthetic" in names and "nope" not in names


def test_unknown_names_suggest_close_ones_and_end_with_the_registrys_sentence() -> None:
    with pytest.raises(UnknownProblemError, match=r"Unknown problem 'toy2'\. Did you mean 'toy_2d'\? All: "):
        _registry().get("toy2")
    with pytest.raises(TypeError, match="A problem name is a str"):
        _registry().get(3)  # type: ignore[arg-type]


def test_a_taken_name_or_alias_is_refused_naming_both_origins_and_nothing_changes() -> None:
    names = _registry()
    with pytest.raises(DuplicateNameError, match=r"'first' of Second \(from in-process \(c\)\) is already taken by "
                                                 r"First \(from built-in\)"):
        names.add(Item(Second, Origin("c"), "third"), aliases=("first",))
    assert "third" not in names
    assert issubclass(DuplicateStrategyError, DuplicateNameError)


def test_listing_by_pattern_in_registration_or_natural_order_and_dropping_a_plugin() -> None:
    names = _registry()
    assert [e.name for e in names.list("*")] == ["Toy-2D", "gradnorm_synthetic"]
    assert [e.name for e in names.list("toy-*")] == ["Toy-2D"]
    assert [e.name for e in names.list("*", exclude="grad*", sort=True)] == ["Toy-2D"]
    assert [e.name for e in names.list("fir*", aliases=lambda e: ("first",) if e.cls is First else ())] == ["Toy-2D"]
    names.drop_plugin("a")
    assert [e.name for e in names.entries()] == ["gradnorm_synthetic"] and "first" not in names
