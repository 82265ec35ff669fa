"""The plugin registry: names, errors, in-process plugins, and entry points (faked, as pytest does)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

import mtlzoo
from mtlzoo import registry
from mtlzoo.errors import (
    DuplicateStrategyError,
    InvalidPluginError,
    InvalidStrategyError,
    MissingHyperparameterError,
    PluginWarning,
    UnknownHyperparameterError,
    UnknownStrategyError,
)
from mtlzoo.roles import WeightingStrategy
from mtlzoo.strategy import StrategyInfo
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
    """A registry of its own whose entry points are the given fakes.

    It also stands in for ``registry.REGISTRY`` during the test, so ``mtlzoo.register_strategy``
    and ``mtlzoo.create`` use it.
    """

    def make(*entry_points: FakeEntryPoint) -> registry.StrategyRegistry:
        monkeypatch.setattr(registry, "_entry_points", lambda: list(entry_points))
        reg = registry.StrategyRegistry()
        monkeypatch.setattr(registry, "REGISTRY", reg)
        return reg

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
    surgery = [e.name for e in mtlzoo.list_strategies("*", kind="surgery", exclude="rotograd*")]
    assert "rotate_only" in surgery and not any(name.startswith("rotograd") for name in surgery)
    assert all(mtlzoo.get_strategy(name).info.kind == "surgery" for name in surgery)
    assert [e.name for e in mtlzoo.list_strategies("EW")] == ["ls"]  # aliases match too
    entry = mtlzoo.get_strategy("rotograd_norm")
    assert entry.hyperparameters["alpha"] is mtlzoo.strategy.REQUIRED
    assert entry.hyperparameters["burn_in_period"] == 20
    assert str(entry.origin) == "built-in"


def test_register_strategy_decorator_lists_creates_trains_and_unregisters() -> None:
    cls = mtlzoo.register_strategy(weighting("test_doubled", aliases=("test-twice",)))
    plugin_name = f"{cls.__module__}:{cls.__qualname__}[test_doubled]"
    try:
        entry = mtlzoo.get_strategy("TEST_TWICE")
        assert entry.cls is cls and str(entry.origin) == f"in-process ({plugin_name})"
        assert entry.origin.plugin == plugin_name
        mtl = mtlzoo.MTLWrapper(small_model(), "test_doubled")
        x, targets = batch()
        mtl.backward(mse_losses(mtl(x), targets))
        assert all(p.grad is not None for p in mtl.model_parameters())
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

    with pytest.raises(InvalidStrategyError, match=r"SurgeryOnLosses.*gradient surgery"):
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
    assert not reg.loader.entry_points_loaded
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
        assert not r.REGISTRY.loader.entry_points_loaded and not r.REGISTRY.loader.builtins_loaded
        mtlzoo.list_strategies()
        assert r.REGISTRY.loader.entry_points_loaded
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_name_patterns_keep_their_character_classes(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    """Issue 7, item 16: `-` in a `[a-m]` class stays a range; only names and `-` outside classes are normalised."""
    reg = fresh()
    reg.register_plugin(plugin_of(weighting("kappa_one"), weighting("mu_two"), weighting("zeta_three")), name="t")

    def listed(*args: object, **kwargs: object) -> list[str]:  # the test's own strategies, not the built-ins
        return [entry.name for entry in reg.list(*args, **kwargs) if entry.origin.plugin == "t"]

    in_range = [entry.name for entry in reg.list("[a-m]*")]
    assert "kappa_one" in in_range and "mu_two" in in_range and "zeta_three" not in in_range
    assert all("a" <= name[0] <= "m" for name in in_range)
    assert "kappa_one" not in [entry.name for entry in reg.list("[!a-m]*")]
    assert listed("MU-*") == ["mu_two"]  # case and `-` outside classes still normalised
    assert listed("*_t[h-i]ree") == ["zeta_three"]
    assert listed("*-t[a-z]*", exclude="[k-m]*") == ["zeta_three"]
    assert [entry.name for entry in reg.list("[mu-two")] == []  # an unclosed `[` is a literal character


def test_aliases_given_as_a_str_are_refused(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    """Issue 7, item 17: `aliases="mw"` would register `m` and `w`; it is refused with the fix spelled out."""
    reg = fresh()
    with pytest.raises(InvalidStrategyError, match=r"Scaled_test_mw .*`aliases` as a str.*`aliases=\('mw',\)`"):
        reg.register_plugin(plugin_of(weighting("test_mw", aliases="mw")), name="t")  # type: ignore[arg-type]
    for name in ["test_mw", "m", "w"]:
        with pytest.raises(UnknownStrategyError):
            reg.get(name)
    assert "t" not in reg.plugins()


def test_register_strategy_replaces_the_same_definition_only(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    """Issue 7, item 18: the same class or a re-run cell replaces itself; another class with the name is refused."""
    reg = fresh()
    first = mtlzoo.register_strategy(weighting("test_cell"))
    origin = reg.get("test_cell").origin
    assert mtlzoo.register_strategy(first) is first  # the same class again: nothing changes
    assert reg.get("test_cell").cls is first and reg.get("test_cell").origin == origin
    rerun = mtlzoo.register_strategy(weighting("test_cell", scale=3.0))  # a re-run cell: same module and qualname
    assert rerun is not first and reg.get("test_cell").cls is rerun and reg.get("test_cell").origin == origin
    assert [name for name in reg.plugins() if "test_cell" in name] == [origin.plugin]

    clashing = weighting("test_cell", aliases=("rotograd",))  # a re-definition that takes a built-in's alias
    with pytest.raises(DuplicateStrategyError, match=r"'rotograd'.*built-in"):
        mtlzoo.register_strategy(clashing)
    assert reg.get("test_cell").cls is rerun and reg.get("test_cell").origin == origin  # the earlier one is kept

    elsewhere = weighting("test-cell")
    elsewhere.__qualname__ = "Elsewhere"
    with pytest.raises(DuplicateStrategyError, match=r"'test_cell' of Elsewhere \(from in-process .*Elsewhere.*\) "
                                                     r"is already taken by Scaled_test_cell \(from in-process .*"
                                                     r"Scaled_test_cell"):
        mtlzoo.register_strategy(elsewhere)
    assert reg.get("test_cell").cls is rerun


def test_register_strategy_takes_factory_made_classes(fresh: Callable[..., registry.StrategyRegistry]) -> None:
    """Issue 7, item 18: classes of one factory share a qualname; with different strategy names both register."""

    def make(name: str, aliases: tuple[str, ...] = ()) -> type[WeightingStrategy]:
        class Made(WeightingStrategy):
            info = StrategyInfo(name=name, aliases=aliases, kind="weighting", needs="losses", summary="factory-made")

            def weights(self, losses: torch.Tensor) -> torch.Tensor:
                return losses.new_ones(self.num_tasks)

        return Made

    reg = fresh()
    one, two = mtlzoo.register_strategy(make("test_made_one")), mtlzoo.register_strategy(make("test_made_two"))
    assert one.__qualname__ == two.__qualname__
    assert reg.get("test_made_one").cls is one and reg.get("test_made_two").cls is two
    with pytest.raises(DuplicateStrategyError, match=r"'test_made_one' of .*Made .*already taken by .*Made"):
        mtlzoo.register_strategy(make("test_made_three", aliases=("test_made_one",)))  # a sibling, not a re-run
    assert reg.get("test_made_one").cls is one and reg.list("test_made_three") == []
    reg.unregister_plugin(reg.get("test_made_one").origin.plugin)
    assert [entry.name for entry in reg.list("test_made_*")] == ["test_made_two"]


@pytest.mark.parametrize("looked_up_first", [False, True])
def test_in_process_registration_never_evicts_an_entry_point(fresh: Callable[..., registry.StrategyRegistry],
                                                             looked_up_first: bool) -> None:
    """Issue 7, item 19: a clash with an entry-point strategy is refused whether or not a lookup came first."""
    reg = fresh(FakeEntryPoint("ep", lambda: plugin_of(weighting("test_ep")), dist="mtlzoo-ep"))
    if looked_up_first:
        reg.get("ls")
    with pytest.raises(DuplicateStrategyError, match=r"'test_ep' .*in-process \(mine\).* taken by .*mtlzoo-ep 1\.2"):
        reg.register_plugin(plugin_of(weighting("test_ep")), name="mine")
    with pytest.raises(DuplicateStrategyError, match=r"'test_ep' .*taken by .*mtlzoo-ep 1\.2"):
        mtlzoo.register_strategy(weighting("test_ep"))
    assert str(reg.get("test_ep").origin) == "mtlzoo-ep 1.2"
    assert set(reg.plugins()) == {registry.BUILTIN_PLUGIN, "ep"}


@pytest.mark.parametrize("option", ["wrapper", "hookwrapper"])
def test_hook_wrappers_are_refused(fresh: Callable[..., registry.StrategyRegistry], option: str) -> None:
    """Issue 7, item 20: a wrapper implementation of the hook would register nothing; it is refused by name."""

    @mtlzoo.hookimpl(**{option: True})
    def mtlzoo_register_strategies(register: Callable[[type], None]) -> Iterator[None]:
        register(weighting("test_wrapped"))
        yield

    def wrapping() -> object:
        return types.SimpleNamespace(mtlzoo_register_strategies=mtlzoo_register_strategies)

    reg = fresh(FakeEntryPoint("wrapping", wrapping, dist="mtlzoo-wrapping"))
    with pytest.warns(PluginWarning, match=r"'mtlzoo-wrapping'.*Plugin 'wrapping' .*does not support wrappers"):
        names = [entry.name for entry in reg.list()]
    assert "test_wrapped" not in names and "wrapping" not in reg.plugins()
    with pytest.raises(InvalidPluginError, match=r"Plugin 'mine' .*hook wrapper.*drop wrapper=True/hookwrapper=True"):
        reg.register_plugin(wrapping(), name="mine")
    assert "mine" not in reg.plugins()
    with pytest.raises(UnknownStrategyError):
        reg.get("test_wrapped")


def test_register_strategy_run_by_an_entry_point_names_its_distribution(
    fresh: Callable[..., registry.StrategyRegistry],
) -> None:
    """Issue 7, item 21: a decorator run while an entry point is imported credits that entry point's distribution."""

    def decorating() -> object:
        mtlzoo.register_strategy(weighting("test_decorated"))
        return types.SimpleNamespace()  # a module that only uses the decorator has no hook

    def decorating_then_failing() -> object:
        mtlzoo.register_strategy(weighting("test_half_imported"))
        raise ImportError("no module named 'missing_dependency'")

    reg = fresh(FakeEntryPoint("deco", decorating, dist="mtlzoo-deco", version="2.0"),
                FakeEntryPoint("half", decorating_then_failing, dist="mtlzoo-half"))
    with pytest.warns(PluginWarning, match=r"'mtlzoo-half'.*missing_dependency"):
        entry = reg.get("test_decorated")
    assert str(entry.origin) == "mtlzoo-deco 2.0"
    assert entry.to_record()["distribution"] == "mtlzoo-deco" and entry.to_record()["version"] == "2.0"
    with pytest.raises(UnknownStrategyError):  # a plugin that fails to import is dropped whole
        reg.get("test_half_imported")
    later = mtlzoo.register_strategy(weighting("test_later"))
    assert str(reg.get("test_later").origin) == f"in-process ({later.__module__}:Scaled_test_later[test_later])"


def test_unknown_hyperparameters_name_the_strategy_and_the_fix() -> None:
    """Issue 7, item 12: a misspelt or foreign keyword names the strategy asked for and suggests the close one."""
    with pytest.raises(UnknownHyperparameterError, match=r"^Strategy 'rotograd' has no hyperparameter "
                                                         r"'normalise_losses'\. Did you mean 'normalize_losses'\?"
                       ) as error:
        mtlzoo.create("RotoGrad", num_tasks=2, normalise_losses=True)
    assert isinstance(error.value, TypeError) and "RotateOnly" not in str(error.value)
    assert "burn_in_period=20" in str(error.value)  # the strategy's hyperparameters are listed
    with pytest.raises(UnknownHyperparameterError, match=r"'alpha' is a hyperparameter of .*'rotograd_norm'"):
        mtlzoo.create("rotograd", num_tasks=2, alpha=1.0)
    with pytest.raises(UnknownHyperparameterError, match=r"^Strategy 'ls' has no hyperparameter 'rotation_shape'\. "
                                                         r"\('rotation_shape' is a hyperparameter of .*'rotograd'"):
        mtlzoo.create("ls", num_tasks=2, rotation_shape=4)
    with pytest.raises(UnknownHyperparameterError, match="normalise_losses"):
        mtlzoo.MTLWrapper(small_model(), "rotograd", normalise_losses=True)


def test_missing_hyperparameters_name_the_strategy_and_the_parameter(
    fresh: Callable[..., registry.StrategyRegistry],
) -> None:
    """Issue 7, item 12: a required hyperparameter left out is named with its strategy, not a class's __init__."""
    with pytest.raises(MissingHyperparameterError, match=r"^Strategy 'rotograd_norm' needs the hyperparameter "
                                                         r"'alpha', which has no default: pass alpha=\.\.\.") as error:
        mtlzoo.create("rotograd-norm", num_tasks=2)
    assert isinstance(error.value, TypeError) and "__init__" not in str(error.value)
    assert "(suggested: alpha=1.5)" in str(error.value)  # the metadata's suggested value, as the harness uses it

    class Flexible(WeightingStrategy):
        info = StrategyInfo(name="test_flexible", kind="weighting", needs="losses", summary="takes any keyword")

        def __init__(self, num_tasks: int, **options: object) -> None:
            super().__init__(num_tasks)
            self.options = options

        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return losses.new_ones(self.num_tasks)

    reg = fresh()
    reg.register_plugin(plugin_of(Flexible), name="t")
    assert reg.create("test_flexible", num_tasks=2, anything=1).options == {"anything": 1}  # **kwargs takes all
    with pytest.raises(MissingHyperparameterError, match="'test_flexible' needs the hyperparameter 'num_tasks'"):
        reg.create("test_flexible")
