"""The problem registry: built-ins through the internal plugin, plugins through ``mtlzoo_register_problems``.

Reference: the registry contract of DESIGN.md (built-ins through the same hook a third party uses,
origins kept, close matches for unknown names, duplicates refused naming both origins), applied to
problems as it is to strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import mtlzoo
from mtlzoo.errors import DuplicateNameError, UnknownHyperparameterError, UnknownProblemError
from mtlzoo.harness.problems import (
    BUILTIN_PROBLEMS,
    Toy2D,
    create_problem,
    get_problem,
    list_problems,
    register_problem,
)
from mtlzoo.registry import REGISTRY


@dataclass(frozen=True)
class Shifted(Toy2D):
    """A plugin's variant of the toy (its own name)."""

    name: ClassVar[str] = "toy2d_shifted"


def test_builtins_are_listed_with_their_origin() -> None:
    entries = list_problems()
    assert [e.name for e in entries][:4] == ["toy2d", "gradnorm_synthetic", "multidigits", "mixedscale"]
    assert [e.cls for e in entries[:4]] == list(BUILTIN_PROBLEMS)
    assert all(str(e.origin) == "built-in" for e in entries[:4])
    record = get_problem("gradnorm-synthetic").to_record()  # '-' equals '_', case-insensitive
    assert record["delta_m"] and record["metrics"][0] == {"name": "mse", "higher_is_better": False}


def test_unknown_names_and_settings_suggest_close_ones() -> None:
    with pytest.raises(UnknownProblemError, match="Did you mean 'toy2d'"):
        get_problem("toy2")
    with pytest.raises(KeyError):  # also a KeyError, like an unknown strategy
        create_problem("nope")
    with pytest.raises(UnknownHyperparameterError, match="Did you mean 'num_tasks'"):
        create_problem("gradnorm_synthetic", num_task=10)


def test_a_plugin_registers_problems_through_the_hook() -> None:
    class Plugin:
        @mtlzoo.hookimpl
        def mtlzoo_register_problems(self, register):
            register(Shifted)

    name = REGISTRY.register_plugin(Plugin(), name="problem-plugin")
    try:
        entry = get_problem("toy2d_shifted")
        assert entry.cls is Shifted and entry.origin.plugin == "problem-plugin" and not entry.origin.builtin
        assert isinstance(create_problem("toy2d_shifted"), Shifted)
    finally:
        REGISTRY.unregister_plugin(name)
    with pytest.raises(UnknownProblemError):
        get_problem("toy2d_shifted")


def test_a_plugin_taking_a_builtin_name_is_refused_with_both_origins() -> None:
    """In this process the plugin is refused with an error (as for strategies); nothing of it is kept."""
    @dataclass(frozen=True)
    class Impostor(Toy2D):
        name: ClassVar[str] = "toy2d"

    class Plugin:
        @mtlzoo.hookimpl
        def mtlzoo_register_problems(self, register):
            register(Impostor)

    with pytest.raises(DuplicateNameError, match=r"'toy2d'.*impostor-plugin.*already taken by Toy2D \(from built-in\)"):
        REGISTRY.register_plugin(Plugin(), name="impostor-plugin")
    assert "impostor-plugin" not in REGISTRY.plugins() and get_problem("toy2d").cls is Toy2D


def test_register_problem_decorator_and_re_registration() -> None:
    register_problem(Shifted)
    try:
        assert get_problem("toy2d_shifted").cls is Shifted
        register_problem(Shifted)  # again: replaces, no error
        assert get_problem("toy2d_shifted").cls is Shifted
        with pytest.raises(DuplicateNameError, match=r"'toy2d_shifted' of .*Other \(from in-process .*\) is already"):
            @register_problem
            @dataclass(frozen=True)
            class Other(Toy2D):
                name: ClassVar[str] = "toy2d_shifted"
    finally:
        REGISTRY.unregister_plugin(f"{Shifted.__module__}:{Shifted.__qualname__}[problem]")
    with pytest.raises(UnknownProblemError):
        get_problem("toy2d_shifted")


def test_entry_point_problems_load_through_the_one_loader_each_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategies' plugin loader feeds the problems too, with the same isolation: a plugin whose problem hook
    raises is dropped whole (with a warning naming its distribution), a taken name is a warning naming both
    origins, and the other plugins' problems load (reference: the registry contract of DESIGN.md)."""
    import types

    from mtlzoo import registry
    from mtlzoo.errors import PluginWarning
    from mtlzoo.harness.problems.registry import ProblemRegistry
    from tests.test_registry import FakeEntryPoint

    def plugin(*classes: type, fail: bool = False) -> types.SimpleNamespace:
        @mtlzoo.hookimpl
        def mtlzoo_register_problems(register):
            for cls in classes:
                register(cls)
            if fail:
                raise RuntimeError("boom")

        return types.SimpleNamespace(mtlzoo_register_problems=mtlzoo_register_problems)

    @dataclass(frozen=True)
    class Impostor(Toy2D):
        name: ClassVar[str] = "toy2d"

    @dataclass(frozen=True)
    class Half(Toy2D):
        name: ClassVar[str] = "toy2d_half"

    entry_points = [FakeEntryPoint("failing", lambda: plugin(Half, fail=True), dist="mtlzoo-failing"),
                    FakeEntryPoint("clash", lambda: plugin(Impostor, Shifted), dist="mtlzoo-clash")]
    monkeypatch.setattr(registry, "_entry_points", lambda: entry_points)
    problems = ProblemRegistry(registry.StrategyRegistry().loader)
    with pytest.warns(PluginWarning) as caught:
        names = [entry.name for entry in problems.list()]
    messages = [str(w.message) for w in caught]
    assert any("'mtlzoo-failing'" in m and "boom" in m for m in messages)
    assert any("'toy2d'" in m and "mtlzoo-clash 1.2" in m and "Toy2D (from built-in)" in m for m in messages)
    from mtlzoo.harness.problems.benchmarks import BENCHMARK_PROBLEMS

    assert names == [cls.name for cls in (*BUILTIN_PROBLEMS, *BENCHMARK_PROBLEMS)] + ["toy2d_shifted"]
    assert problems.get("toy2d").cls is Toy2D and str(problems.get("toy2d_shifted").origin) == "mtlzoo-clash 1.2"
