"""Defects found by using mtlzoo as a new user would (issue 7), one test per item, each failing before its fix.

Items 12 and 16-21 (the registry) are in test_registry.py and test_cli.py; item 15 in test_step_protocol.py.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import CheckpointMismatchError, LossError, NonFiniteGradientError, ShapeMismatchError
from mtlzoo.strategy import GramianWeightedSurgery, StrategyInfo, WeightingStrategy
from tests.helpers import assert_same_state, batch, mse_losses, small_model

ROOT = Path(__file__).resolve().parent.parent


class ConvNet(nn.Module):
    """A small CNN whose representation is (batch, 4, h, w) for any h, w."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({
            "mean": nn.Sequential(nn.Conv2d(4, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            "max": nn.Sequential(nn.Conv2d(4, 1, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten()),
        })


def test_item_1_hard_sharing_takes_a_module_dict() -> None:
    """Item 1: HardSharing(backbone, nn.ModuleDict(...)) raised `str is not a Module subclass`."""
    heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)})
    model = mtlzoo.HardSharing(nn.Linear(3, 4), heads)
    assert model.heads is heads
    out = model(torch.randn(2, 3))
    assert list(out) == ["a", "b"] and out["b"].shape == (2, 2)


def test_item_2_post_shape_rotates_maps_of_any_spatial_size() -> None:
    """Item 2: post_shape had to equal the training size; only its number of dimensions counts now."""
    mtl = mtlzoo.MTLWrapper(ConvNet(), "rotograd", rotation_shape=4, post_shape=(6, 6))
    out = mtl(torch.randn(2, 1, 6, 6))
    mtl.backward({name: p.pow(2).mean() for name, p in out.items()})
    mtl.eval()
    with torch.no_grad():
        full = mtl(torch.randn(3, 1, 10, 12))
        assert full["max"].shape == (3, 1)
        x = torch.randn(1, 1, 10, 12)
        torch.testing.assert_close(mtl["mean"](x), mtl(x)["mean"])


def test_item_3_a_rotation_shape_with_the_batch_dimension_is_refused() -> None:
    """Item 3: rotation_shape=backbone(x).shape was accepted and built rotations that mix samples."""
    backbone = nn.Linear(5, 4)
    x = torch.randn(6, 5)
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, [nn.Linear(4, 1)] * 2), "rotograd",
                            rotation_shape=tuple(backbone(x).shape))
    with pytest.raises(ShapeMismatchError, match=r"no batch dimension.*rotation_shape=\(4,\)"):
        mtl(x)


def test_item_3_a_large_inferred_rotation_warns_and_names_post_shape() -> None:
    """Item 3: lazy inference on a CNN without post_shape built n = C*h*w in silence. Said once (the wrapper
    used to repeat the strategy's warning, with n read from the parameters' shape)."""
    backbone = nn.Conv2d(1, 16, 3, padding=1)
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, [nn.Flatten(), nn.Flatten()]), "rotate_only",
                            rotation_init="identity")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        mtl(torch.randn(1, 1, 10, 10))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and re.search(r"n = 1600.*post_shape=\(h, w\)", messages[0]), messages


class ExtrasBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(self.linear(x))
        return z, z.pow(2).mean()  # an auxiliary output attached to the backbone's graph


@pytest.mark.parametrize("strategy", ["ls", "rotate_only", "parameters"])
def test_item_4_backbone_extras_in_the_losses_reach_the_backbone(strategy: str) -> None:
    """Item 4: a loss that used the backbone's extras broke every gradient path (backward through the graph a
    second time); ls worked, RotoGrad did not. The gradients now equal plain summed-loss training."""
    from tests.test_step_protocol import SumSurgery

    torch.manual_seed(0)
    model = mtlzoo.HardSharing(ExtrasBackbone(), [nn.Linear(4, 1), nn.Linear(4, 1)])
    plain = copy.deepcopy(model)
    chosen = SumSurgery(2, target="parameters") if strategy == "parameters" else strategy
    kwargs = {"rotation_shape": 4, "rotation_init": "identity"} if strategy == "rotate_only" else {}
    mtl = mtlzoo.MTLWrapper(model, chosen, **kwargs)
    x, targets = batch(2)
    predictions, (aux,) = mtl(x)
    mtl.backward([((p - t) ** 2).mean() + 0.5 * aux for p, t in zip(predictions, targets)])
    z, plain_aux = plain.backbone(x)
    total = sum(((head(z) - t) ** 2).mean() + 0.5 * plain_aux for head, t in zip(plain.heads, targets))
    expected = torch.autograd.grad(total, list(plain.parameters()))
    for ours, theirs in zip(model.parameters(), expected):
        torch.testing.assert_close(ours.grad, theirs)


def test_item_6_the_model_moved_to_double_after_wrapping_still_trains() -> None:
    """Item 6: model.to(float64) after wrapping gave "expected scalar type Double but found Float"."""
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, "rotograd", rotation_shape=4)
    model.to(torch.float64)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x.double()), targets.double()))
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in mtl.strategy_parameters())


def test_item_7_a_zero_loss_at_the_reference_step_is_not_a_divisor() -> None:
    """Item 7: normalize_losses with a loss of exactly 0 at the reference step back-propagated NaN."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, normalize_losses=True)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.01)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    with pytest.warns(RuntimeWarning, match=r"tasks \[1\] were 0 at their reference step"):
        mtl.backward([losses[0], 0 * losses[1], losses[2]])
    assert all(torch.isfinite(p.grad).all() for p in mtl.parameters() if p.grad is not None)
    mtl.step(optimizer)
    assert math.isnan(mtl.strategy.initial_losses[1])
    optimizer.zero_grad()
    later = mse_losses(mtl(x), targets)
    mtl.backward(later)  # task 1 takes its reference at its first non-zero loss
    mtl.step(optimizer)
    torch.testing.assert_close(mtl.strategy.initial_losses[1], later[1].detach())


def test_item_8_a_refused_backward_leaves_the_wrapper_as_before() -> None:
    """Item 8: a LossError caught by the user left the next forward warning that a forward ran again."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    with pytest.raises(LossError):
        mtl.backward([losses[0] * math.nan, *losses[1:]])
    mtl.backward(mse_losses(mtl(x), targets))  # the next batch: no warning (warnings are errors here)
    assert all(p.grad is not None for p in mtl.model_parameters())


def test_item_9_a_weighting_with_a_weights_argument_prints() -> None:
    """Item 9: Strategy.extra_repr recursed forever when a constructor argument was named `weights`."""

    class Fixed(WeightingStrategy):
        info = StrategyInfo(name="test_fixed_weights", kind="weighting", summary="fixed")

        def __init__(self, num_tasks: int, weights: tuple[float, ...] = (1.0, 2.0)) -> None:
            super().__init__(num_tasks)
            self.fixed = torch.tensor(weights)

        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return self.fixed

    assert repr(Fixed(2, weights=(3.0, 4.0))) == "Fixed(num_tasks=2, weights=(3.0, 4.0))"
    print(mtlzoo.MTLWrapper(small_model(2), Fixed(2)))


@pytest.mark.parametrize(("saved", "loaded", "setting"), [
    ({"orthogonal_map": "cayley"}, {"orthogonal_map": "householder"}, "orthogonal_map"),
    ({"normalize_losses": True}, {"normalize_losses": False}, "normalize_losses"),
    ({"burn_in_period": 5}, {"burn_in_period": 20}, "burn_in_period"),
])
def test_item_10_a_checkpoint_with_other_settings_is_refused(saved: dict, loaded: dict, setting: str) -> None:
    """Item 10: a cayley checkpoint loaded into a householder strategy with "All keys matched"."""
    source = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, **saved)
    target = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, **loaded)
    before = copy.deepcopy(target.state_dict())
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=f"{setting}: checkpoint"):
            target.load_state_dict(source.state_dict(), strict=strict)
    assert_same_state(before, target.state_dict())  # refused before anything loads
    with pytest.raises(CheckpointMismatchError, match=setting):
        target.strategy.load_state_dict(source.strategy.state_dict())


def test_item_11_reflections_are_not_rotations() -> None:
    """Item 11: the rotations setter accepted reflections (det = -1)."""
    strategy = mtlzoo.create("rotograd", num_tasks=2, rotation_shape=3)
    reflection = torch.eye(3).repeat(2, 1, 1)
    reflection[1, 0, 0] = -1
    with pytest.raises(ValueError, match=r"determinant \+1; matrices \[1\] are reflections"):
        strategy.rotations = reflection


def test_item_14_huge_gradients_give_a_finite_step_or_a_clear_error() -> None:
    """Item 14: losses scaled by 1e30 gave RotoGrad a non-finite backbone gradient in silence."""
    x, targets = batch()
    ls = mtlzoo.MTLWrapper(small_model(), "ls")
    ls.backward([1e30 * loss for loss in mse_losses(ls(x), targets)])
    assert all(torch.isfinite(p.grad).all() for p in ls.parameters())
    mtl = mtlzoo.MTLWrapper(small_model(), "rotate_only", rotation_shape=4)
    with pytest.raises(NonFiniteGradientError, match="GradScaler"):
        mtl.backward([1e30 * loss for loss in mse_losses(mtl(x), targets)])
    assert all(p.grad is None for p in mtl.parameters())
    frozen = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4)
    frozen.strategy.requires_grad_(False)  # no rotation objective: the update itself must be finite
    frozen.backward([1e30 * loss for loss in mse_losses(frozen(x), targets)])
    assert all(torch.isfinite(p.grad).all() for p in frozen.model_parameters())


def test_item_23_the_reference_tests_skip_without_the_extra(tmp_path: Path) -> None:
    """Item 23: without the `reference` extra the reference tests failed at collection."""
    (tmp_path / "rotograd.py").write_text("raise ImportError('the reference extra is not installed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/strategies/test_rotograd_reference.py"],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: every test skipped, none collected
    assert "skipped" in result.stdout and "error" not in result.stdout.lower()


class DiagonalGramian(GramianWeightedSurgery):
    """Weights 1/sqrt(G_kk): the sum of the normalised task gradients, read from the Gramian alone."""

    info = StrategyInfo(name="test_diagonal", kind="surgery", summary="normalised sum", needs="parameter_jacobian")

    def gramian_weights(self, gramian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return gramian.diagonal().rsqrt()


@pytest.mark.parametrize("target", ["parameters", "representation"])
def test_item_24_the_gramian_is_the_gramian(target: str) -> None:
    """Item 24: replacing the Gramian by the identity survived the suite. Here the update is
    sum_k g_k / ||g_k||, computed by hand from per-task autograd gradients."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch()
    losses = mse_losses(model(x), targets)
    if target == "parameters":
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.backbone.parameters()),
                                                                    retain_graph=True)]) for loss in losses]
        expected = sum(row / row.norm() for row in rows)
    mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), DiagonalGramian(3, target=target))
    mtl.backward(mse_losses(mtl(x), targets))
    actual = torch.cat([p.grad.flatten() for p in mtl.backbone.parameters()])
    if target == "parameters":
        torch.testing.assert_close(actual, expected)
    else:
        z = model.backbone(x)
        grads = [torch.autograd.grad(((head(z) - t) ** 2).mean(), z, retain_graph=True)[0]
                 for head, t in zip(model.heads, targets)]
        dz = sum(g / g.norm() for g in grads)
        expected = torch.autograd.grad(z, list(model.backbone.parameters()), dz)
        torch.testing.assert_close(actual, torch.cat([g.flatten() for g in expected]))


@pytest.mark.parametrize("strategy", ["ls", "rotate_only"])
def test_item_24_named_losses_are_taken_by_name_not_by_dict_order(strategy: str) -> None:
    """Item 24: losses given as a dict in another order must be weighted as their task's, by name."""
    torch.manual_seed(0)
    model = small_model(named=True)
    plain = copy.deepcopy(model)
    weights = {"task0": 1.0, "task1": 5.0, "task2": 0.1}
    if strategy == "ls":
        mtl = mtlzoo.MTLWrapper(model, "ls", weights=list(weights.values()))
    else:  # a gradient path: normalize_losses weighs each loss by 1 / its own reference value
        mtl = mtlzoo.MTLWrapper(model, "rotate_only", rotation_shape=4, rotation_init="identity",
                                normalize_losses=True)
    x, targets = batch()
    out = mtl(x)
    losses = {name: ((out[name] - targets[k]) ** 2).mean() for k, name in enumerate(weights)}
    if strategy == "rotate_only":
        weights = {name: 1 / loss.item() for name, loss in losses.items()}
    mtl.backward(dict(reversed(list(losses.items()))))
    reference = plain(x)
    for k, name in enumerate(weights):
        loss = weights[name] * ((reference[name] - targets[k]) ** 2).mean()
        expected = torch.autograd.grad(loss, list(plain.heads[name].parameters()))
        for ours, theirs in zip(model.heads[name].parameters(), expected):
            torch.testing.assert_close(ours.grad, theirs)


def test_item_25_docstrings_carry_no_measurements() -> None:
    """Item 25: benchmark ratios and a claim about a torch bug in docstrings go stale."""
    import re

    for entry in mtlzoo.list_strategies():
        if entry.origin.builtin:
            module = sys.modules[entry.cls.__module__]
            text = (entry.cls.__doc__ or "") + (module.__doc__ or "")
            assert not re.search(r"\d(\.\d+)?x\b", text), f"{entry.name}: a ratio in a docstring"
    bank = (ROOT / "mtlzoo" / "strategies" / "_rotation_bank.py").read_text()
    assert "set_num_threads" not in bank and "torch 2.13" not in bank


def test_item_24_the_caller_parts_are_the_wrappers_and_unchanged() -> None:
    """Item 24: the old test compared a list that nothing touches. The wrapper must use the caller's very
    modules (shared, not copied) and leave their classes, hooks and parameters as they were."""
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    model = mtlzoo.HardSharing(nn.Linear(5, 4), heads)
    before = copy.deepcopy(model.state_dict())
    mtl = mtlzoo.MTLWrapper(model, "rotograd", rotation_shape=4)
    assert mtl.backbone is model.backbone and all(a is b for a, b in zip(mtl.heads, heads))
    assert all(type(h) is nn.Linear and not h._forward_hooks and not h._forward_pre_hooks for h in heads)
    assert set(model.state_dict()) == set(before)
    x = torch.randn(3, 5)
    torch.testing.assert_close(heads[0](model.backbone(x)), model(x)[0])
