"""RotoGrad's rotation folded into a linear head: ``W (R z) = (W R) z`` (``fold_linear_heads``, issue 12).

Reference: the unfolded computation (rotate the batch, then the head) on the same model, for the
predictions, every gradient a backward produces (heads, backbone, tangents of the rotations) and a
few training steps; and the conditions under which folding would be visible (hooks, subclasses,
a channel layout, a head wider than the batch), where the head must see the rotated batch itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.strategies._rotation_bank import haar_rotations

FAMILY = ["rotate_only", "rotograd", "rotograd_norm"]
DIM = 6


def options(name: str, **kwargs: object) -> dict:
    return {"alpha": 1.0, **kwargs} if name == "rotograd_norm" else dict(kwargs)


def model_with(heads: list[nn.Module]) -> mtlzoo.HardSharing:
    torch.manual_seed(0)
    return mtlzoo.HardSharing(nn.Sequential(nn.Linear(3, DIM), nn.Tanh()), heads)


def mixed_heads() -> list[nn.Module]:
    torch.manual_seed(1)
    return [nn.Linear(DIM, 1), nn.Sequential(nn.Linear(DIM, 4), nn.ReLU(), nn.Linear(4, 2)), nn.Linear(DIM, 1)]


def wrapped(model: nn.Module, name: str, fold: bool, orthogonal_map: str = "retraction") -> mtlzoo.MTLWrapper:
    mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), name, **options(name, rotation_shape=DIM, fold_linear_heads=fold,
                                                                  orthogonal_map=orthogonal_map))
    mtl.strategy.rotations = haar_rotations(3, DIM, generator=torch.Generator().manual_seed(3))
    return mtl


def losses_of(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    return [((p - t) ** 2).mean() for p, t in zip(predictions, targets)]


def data(rows: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 3, generator=generator)
    return x, [torch.randn(rows, 1, generator=generator), torch.randn(rows, 2, generator=generator),
               torch.randn(rows, 1, generator=generator)]


def gradients(mtl: mtlzoo.MTLWrapper) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in mtl.named_parameters() if p.grad is not None}
    return grads


def count_adapt_calls(mtl: mtlzoo.MTLWrapper, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tasks whose representation the rotations adapter rotates (``adapt``), in call order."""
    calls: list[int] = []
    original = type(mtl.strategy.adapter).adapt

    def adapt(self: object, z: torch.Tensor, task: int) -> torch.Tensor:
        calls.append(task)
        return original(self, z, task)
    monkeypatch.setattr(type(mtl.strategy.adapter), "adapt", adapt)
    return calls


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("orthogonal_map", ["retraction", "matrix_exp"])
def test_folded_heads_give_the_unfolded_predictions_and_gradients(name: str, orthogonal_map: str) -> None:
    """Reference: the unfolded step. Fails if the fold multiplies R W or W R^T (a rotation by R^T), or if the rotation's
    objective or a head's weight gradient is lost when the batch is no longer rotated."""
    model = model_with(mixed_heads())
    x, targets = data()
    results = {}
    for fold in (False, True):
        mtl = wrapped(model, name, fold, orthogonal_map)
        predictions = mtl(x)
        mtl.backward(losses_of(predictions, targets))
        results[fold] = ([p.detach() for p in predictions], gradients(mtl))
    (unfolded, unfolded_grads), (folded, folded_grads) = results[False], results[True]
    for a, b in zip(folded, unfolded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert folded_grads.keys() == unfolded_grads.keys()
    assert any("tangent" in key or "original" in key for key in folded_grads)
    for key in unfolded_grads:
        torch.testing.assert_close(folded_grads[key], unfolded_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_folding_does_not_rotate_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold is taken where it applies: no head's input is rotated (adapt is not called) for linear heads."""
    mtl = wrapped(model_with(mixed_heads()), "rotograd", fold=True)
    calls = count_adapt_calls(mtl, monkeypatch)
    mtl(data()[0])
    assert calls == []


def test_training_with_folded_heads_follows_the_unfolded_run() -> None:
    """Reference: 5 SGD steps of the unfolded model; the folded one stays on the same trajectory (rounding only)."""
    model = model_with(mixed_heads())
    runs = {}
    for fold in (False, True):
        mtl = wrapped(model, "rotograd", fold)
        optimizer = torch.optim.SGD([{"params": list(mtl.model_parameters())},
                                     {"params": mtl.strategy_parameters(), "lr": 0.05}], lr=0.05)
        for step in range(5):
            x, targets = data()
            optimizer.zero_grad()
            mtl.backward(losses_of(mtl(x + step), targets))
            mtl.step(optimizer)
        runs[fold] = mtl
    torch.testing.assert_close(runs[True].strategy.rotations, runs[False].strategy.rotations, rtol=1e-4, atol=1e-5)
    for a, b in zip(runs[True].model_parameters(), runs[False].model_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ScaledLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input)


def hooked_linear() -> nn.Module:
    head = nn.Linear(DIM, 1)
    head.register_forward_hook(lambda module, args, output: output * 3)
    return head


@pytest.mark.parametrize("make_head", [lambda: ScaledLinear(DIM, 1), hooked_linear,
                                       lambda: nn.Sequential(nn.Identity(), nn.Linear(DIM, 1)),
                                       lambda: nn.Linear(DIM, 40)],
                         ids=["subclass", "forward hook", "not first", "wider than the batch"])
def test_heads_that_cannot_be_folded_see_the_rotated_batch(make_head: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head whose first layer is not a plain, unhooked linear layer narrower than the batch reads R z itself (a
    subclass's forward and a hook still run, and give the unfolded result)."""
    torch.manual_seed(2)
    heads = [make_head() for _ in range(3)]  # type: ignore[operator]
    model = model_with(heads)
    x = data()[0]
    expected = [p.detach() for p in wrapped(model, "rotate_only", fold=False)(x)]
    mtl = wrapped(model, "rotate_only", fold=True)
    calls = count_adapt_calls(mtl, monkeypatch)
    for a, b in zip(mtl(x), expected):
        torch.testing.assert_close(a.detach(), b)
    assert calls == [0, 1, 2]


def test_global_module_hooks_turn_folding_off() -> None:
    """A global forward hook must see every linear head's call, with the rotated batch as its input."""
    mtl = wrapped(model_with(mixed_heads()), "rotograd", fold=True)
    seen: list[torch.Tensor] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(args[0]) if type(module) is nn.Linear and module.in_features == DIM
        else None)
    try:
        mtl(data()[0])
    finally:
        handle.remove()
    assert len(seen) == 3


def test_channel_rotations_are_not_folded() -> None:
    """post_shape: the rotation acts on channels, not on the dimension a linear head reads; no fold, same outputs."""
    torch.manual_seed(0)
    backbone = nn.Conv2d(2, 3, 3, padding=1)
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1)) for _ in range(2)]
    model = mtlzoo.HardSharing(backbone, heads)
    x = torch.randn(5, 2, 4, 4)
    outputs = {}
    for fold in (False, True):
        mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), "rotograd", rotation_shape=3, post_shape=(4, 4),
                                fold_linear_heads=fold)
        mtl.strategy.rotations = haar_rotations(2, 3, generator=torch.Generator().manual_seed(1))
        outputs[fold] = [p.detach() for p in mtl(x)]
    for a, b in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(a, b)


def test_fold_linear_heads_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="fold_linear_heads"):
        mtlzoo.create("rotograd", num_tasks=2, rotation_shape=3, fold_linear_heads="yes")


def test_autocast_folded_step_trains() -> None:
    """bf16 autocast: the folded product W R is formed in float32 and the step lowers every loss."""
    model = model_with(mixed_heads())
    mtl = wrapped(model, "rotograd", fold=True)
    optimizer = torch.optim.Adam([{"params": list(mtl.model_parameters()), "lr": 1e-2},
                                  {"params": mtl.strategy_parameters(), "lr": 1e-3}])
    x, targets = data(64)
    first = None
    for _ in range(40):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = losses_of(mtl(x), targets)
        mtl.backward([loss.float() for loss in losses])
        mtl.step(optimizer)
        first = first or [float(loss.detach()) for loss in losses]
    assert all(float(loss.detach()) < start for loss, start in zip(losses, first))
