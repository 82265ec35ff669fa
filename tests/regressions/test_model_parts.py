"""What the wrapper accepts as a model and leaves of it (regressions from the new-user audit, issue 7):
named heads, spatial rotation shapes, a model moved after wrapping, rotations that are rotations, the
caller's parts left unchanged."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import ShapeMismatchError
from tests.helpers import batch, mse_losses, small_model


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


def test_item_6_the_model_moved_to_double_after_wrapping_still_trains() -> None:
    """Item 6: model.to(float64) after wrapping gave "expected scalar type Double but found Float"."""
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, "rotograd", rotation_shape=4)
    model.to(torch.float64)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x.double()), targets.double()))
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in mtl.strategy_parameters())


def test_item_11_reflections_are_not_rotations() -> None:
    """Item 11: the rotations setter accepted reflections (det = -1)."""
    strategy = mtlzoo.create("rotograd", num_tasks=2, rotation_shape=3)
    reflection = torch.eye(3).repeat(2, 1, 1)
    reflection[1, 0, 0] = -1
    with pytest.raises(ValueError, match=r"determinant \+1; matrices \[1\] are reflections"):
        strategy.rotations = reflection


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
