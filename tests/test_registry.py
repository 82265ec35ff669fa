"""The plugin registry: names, errors, in-process plugins, and entry points (faked, as pytest does)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import warnings
from collections.abc import Callable

import pytest
import torch

import mtlzoo
from mtlzoo import registry
from mtlzoo.errors import DuplicateStrategyError, InvalidStrategyError, PluginWarning, UnknownStrategyError
from mtlzoo.strategy import StrategyInfo, WeightingStrategy
from tests.helpers import batch, mse_losses, small_model


def weighting(name: str, aliases: tuple[str, ...] = (), scale: float = 2.0) -> type[WeightingStrategy]:
    class Scaled(WeightingStrategy):
        info = StrategyInfo(name=name, aliases=aliases, kind="weighting", needs="losses", summary="scaled sum")

        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return losses.new_full((self.num_tasks,), scale)

    Scaled.__qualname__ = f"Scaled_{name}"
    return Scaled


def plugin_of(*classes: type) -> types.SimpleNamespace:
    @mtlzoo.hookimpl
    def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
        for cls in classes:
            register(cls)

    return types.SimpleNamespace(mtlzoo_register_strategies=mtlzoo_register_strategies)


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: a name, a value, a distribution and load()."""

    def __init__(self, name: str, load: Callable[[], object], dist: str = "mtlzoo-fake", version: str = "1.2") -> None:
        self.name, self.value, self._load, self.dist = name, f"fake_{name}", load, FakeDist(dist, version)

    def load(self) -> object:
        return self._load()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Callable[..., registry.StrategyRegistry]:
    """A registry of its own whose entry points are the given fakes."""

    def make(*entry_points: FakeEntryPoint) -> registry.StrategyRegistry:
        monkeypatch.setattr(registry, "_entry_points", lambda: list(entry_points))
        return registry.StrategyRegistry()

    return make


def test_names_are_case_insensitive_and_dash_equals_underscore() -> None:
    for name in ["rotograd_norm", "RotoGrad-Norm", "ROTOGRADNORM", "rotogradnorm"]:
        assert mtlzoo.get_strategy(name).cls is mtlzoo.strategies.RotoGradNorm
    assert mtlzoo.get_strategy("EW").name == "ls"
    assert mtlzoo.get_strategy("rotate-only").name == "rotate_only"


def test_unknown_name_is_a_key_error_with_suggestions() -> None:
    with pytest.raises(KeyError) as error:
        mtlzoo.create("rotgrad", num_tasks=2)
    assert isinstance(error.value, UnknownStrategyError)
    message = str(error.value)
    assert message.startswith("Unknown strategy 'rotgrad'. Did you mean 'rotograd'")
    assert "mtlzoo list" in message
    with pytest.raises(UnknownStrategyError, match=r"Unknown strategy 'zzz'\. `mtlzoo list`"):
        mtlzoo.MTLWrapper(small_model(), "zzz")


def test_listing_filters_and_sorts() -> None:
    names = [entry.name for entry in mtlzoo.list_strategies()]
    assert {"ls", "rotate_only", "rotograd", "rotograd_norm"} <= set(names)
    assert names == sorted(names)
    assert [e.name for e in mtlzoo.list_strategies("roto*")] == ["rotograd", "rotograd_norm"]
    assert [e.name for e in mtlzoo.list_strategies("*", kind="surgery", exclude="rotograd*")] == ["rotate_only"]
    assert [e.name for e in mtlzoo.list_strategies("EW")] == ["ls"]  # aliases match too
    entry = mtlzoo.get_strategy("rotograd_norm")
    assert entry.hyperparameters["alpha"] is mtlzoo.strategy.REQUIRED
    assert entry.hyperparameters["burn_in_period"] == 20
    assert str(entry.origin) == "built-in"


def test_register_strategy_decorator_lists_creates_trains_and_unregisters() -> None:
    cls = mtlzoo.register_strategy(weighting("test_doubled", aliases=("test-twice",)))
    plugin_name = f"{cls.__module__}:{cls.__qualname__}"
    try:
        entry = mtlzoo.get_strategy("TEST_TWICE")
        assert entry.cls is cls and str(entry.origin) == f"in-process ({plugin_name})"
        mtl = mtlzoo.MTLWrapper(small_model(), "test_doubled")
        x, targets = batch()
        mtl.backward(mse_losses(mtl(x), targets))
        assert all(p.grad is not None for p in mtl.model_parameters())
        with pytest.raises(DuplicateStrategyError, match="unregister_plugin"):
            mtlzoo.register_strategy(cls)  # registering the same class again, e.g. a re-run notebook cell
    finally:
        registry.REGISTRY.unregister_plugin(plugin_name)
    with pytest.raises(UnknownStrategyError):
        mtlzoo.get_strategy("test_doubled")


def test_one_hook_registers_many_strategies_and_origins_are_kept() -> None:
    name = registry.REGISTRY.register_plugin(plugin_of(weighting("test_a"), weighting("test_b")), name="test-pair")
    try:
        assert [str(e.origin) for e in mtlzoo.list_strategies("test_?")] == ["in-process (test-pair)"] * 2
    finally:
        registry.REGISTRY.unregister_plugin(name)
    assert mtlzoo.list_strategies("test_?") == []


def test_duplicate_names_are_refused_naming_both_origins() -> None:
    before = [e.name for e in mtlzoo.list_strategies()]
    with pytest.raises(DuplicateStrategyError, match=r"'rotograd' of Scaled_x .*in-process.* taken by RotoGrad "
                                                     r"\(from built-in\)"):
        mtlzoo.register_strategy(weighting("x", aliases=("rotograd",)))
    with pytest.raises(DuplicateStrategyError, match="'ew'"):
        registry.REGISTRY.register_plugin(plugin_of(weighting("test_fine"), weighting("ew")), name="test-dup")
    assert [e.name for e in mtlzoo.list_strategies()] == before  # nothing of the refused plugin is kept


def test_invalid_registrations_are_refused() -> None:
    with pytest.raises(InvalidStrategyError, match=r"subclass of mtlzoo\.Strategy"):
        registry.REGISTRY.register_plugin(plugin_of(int), name="test-int")

    class NoInfo(WeightingStrategy):
        pass

    with pytest.raises(InvalidStrategyError, match="StrategyInfo"):
        mtlzoo.register_strategy(NoInfo)

    class SurgeryOnLosses(mtlzoo.GradientSurgery):
        info = StrategyInfo(name="test_bad_surgery", kind="surgery", needs="losses", summary="wrong needs")

    with pytest.raises(InvalidStrategyError, match="gradient surgery needs one of"):
        SurgeryOnLosses(2)


def test_entry_points_load_lazily_each_on_its_own(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    def broken() -> object:
        raise ImportError("no module named 'missing_dependency'")

    good = FakeEntryPoint("good", lambda: plugin_of(weighting("test_good")), dist="mtlzoo-good")
    bad = FakeEntryPoint("bad", broken, dist="mtlzoo-broken", version="0.0.1")
    clash = FakeEntryPoint("clash", lambda: plugin_of(weighting("ls")), dist="mtlzoo-clash")
    later = FakeEntryPoint("later", lambda: plugin_of(weighting("test_later")), dist="mtlzoo-later")
    same_name = FakeEntryPoint("good", lambda: plugin_of(weighting("test_shadowed")), dist="mtlzoo-other")
    reg = fresh(bad, good, clash, later, same_name)
    assert not reg._entry_points_loaded
    with pytest.warns(PluginWarning) as caught:
        names = [entry.name for entry in reg.list()]
    messages = [str(w.message) for w in caught]
    assert any("'mtlzoo-broken' 0.0.1" in m and "missing_dependency" in m for m in messages)
    assert any("'ls'" in m and "mtlzoo-clash 1.2" in m and "built-in" in m for m in messages)
    assert any("'mtlzoo-other'" in m and "'good' is already loaded (from mtlzoo-good 1.2)" in m for m in messages)
    assert "test_good" in names and "test_later" in names and "test_shadowed" not in names
    assert str(reg.get("test_good").origin) == "mtlzoo-good 1.2"
    assert reg.get("ls").cls is mtlzoo.strategies.LinearScalarization
    assert reg.create("test_later", num_tasks=2).num_tasks == 2


def test_plugin_with_a_failing_hook_is_dropped_whole(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    @mtlzoo.hookimpl
    def mtlzoo_register_strategies(register: Callable[[type], None]) -> None:
        register(weighting("test_partial"))
        raise RuntimeError("boom")

    reg = fresh(FakeEntryPoint("failing", lambda: types.SimpleNamespace(
        mtlzoo_register_strategies=mtlzoo_register_strategies), dist="mtlzoo-failing"))
    with pytest.warns(PluginWarning, match="mtlzoo-failing.*boom"):
        names = [entry.name for entry in reg.list()]
    assert "test_partial" not in names and "rotograd" in names


def test_unknown_hooks_are_reported(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    @mtlzoo.hookimpl
    def mtlzoo_register_strategys(register: Callable[[type], None]) -> None:  # misspelt hook
        pass

    reg = fresh(FakeEntryPoint("typo", lambda: types.SimpleNamespace(
        mtlzoo_register_strategys=mtlzoo_register_strategys), dist="mtlzoo-typo"))
    with pytest.warns(PluginWarning, match="mtlzoo-typo.*mtlzoo_register_strategys"):
        reg.load()


def test_environment_variable_disables_autoload(fresh: Callable[..., registry.StrategyRegistry],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reg = fresh(FakeEntryPoint("good", lambda: plugin_of(weighting("test_good"))))
    monkeypatch.setenv("MTLZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = [entry.name for entry in reg.list()]
    assert "test_good" not in names and "rotograd" in names


def test_import_loads_no_entry_point() -> None:
    code = textwrap.dedent("""
        import mtlzoo, mtlzoo.registry as r
        assert not r.REGISTRY._entry_points_loaded and not r.REGISTRY._builtins_loaded
        mtlzoo.list_strategies()
        assert r.REGISTRY._entry_points_loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
