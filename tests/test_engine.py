"""The Jacobian engine (issue 9): batched, chunked and looped Jacobians agree; vmap's fallback.

Reference: the per-task loop of plain ``torch.autograd.grad`` calls, one per task, which is the
definition of the Jacobian's rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mtlzoo.engine.jacobian import JacobianRoute, parameter_jacobian
from mtlzoo.sharing import HardSharing
from mtlzoo.wrapper import MTLWrapper


class SplitBackbone(nn.Module):
    """Convolutions, batch-norm, dropout; ``z = [a(x), b(x)]`` and an unused parameter.

    Task 0 reads only the first half of ``z``, so it does not reach ``b``'s parameters: zeros in its row.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                               nn.Conv2d(4, 3, 3, stride=2), nn.Flatten())
        self.b = nn.Sequential(nn.Conv2d(2, 3, 5), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten())
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


def representation_gradients(z: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Per-task dL_k/dz of fixed quadratic losses; task 0 sees only the first half of z."""
    generator = torch.Generator().manual_seed(3)
    grads = torch.randn(num_tasks, *z.shape, generator=generator)
    grads[0, :, z.shape[1] // 2:] = 0
    return grads


def looped_reference(z: torch.Tensor, grads: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for grad in grads:
        parts = torch.autograd.grad(z, params, grad, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel()) if g is None else g.flatten() for g, p in zip(parts, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4, 9])
def test_batched_chunked_and_looped_jacobians_equal_the_per_task_loop(mode: str, chunk_size: int | None) -> None:
    """Convolutions, batch-norm in train and eval mode, dropout under a fixed seed, an unreached half and an
    unused parameter: every chunking gives the per-task loop's rows, zeros where a task does not reach."""
    torch.manual_seed(0)
    backbone = SplitBackbone().train(mode == "train")
    z = backbone(torch.randn(6, 2, 7, 7))
    params = list(backbone.parameters())
    grads = representation_gradients(z, num_tasks=5)
    expected = looped_reference(z, grads, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on these operations
        actual = parameter_jacobian(z, grads, params, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    offsets, columns = 0, {}
    for name, param in backbone.named_parameters():
        part = name.split(".")[0]
        columns[part] = columns.get(part, []) + list(range(offsets, offsets + param.numel()))
        offsets += param.numel()
    b_columns, unused = columns["b"], columns["unused"]
    assert actual[0, b_columns].abs().max() == 0 and actual[1, b_columns].abs().max() > 0
    assert actual[:, unused].abs().max() == 0 and actual[0, columns["a"]].abs().max() > 0

def test_the_module_default_chunk_size_applies_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    z = backbone(torch.randn(5, 4))
    grads = torch.randn(7, 5, 3)
    params = list(backbone.parameters())
    calls: list[bool] = []
    original = torch.autograd.grad

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("is_grads_batched")))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.autograd, "grad", counting)
    actual = parameter_jacobian(z, grads, params, chunk_size=3)
    assert calls == [True, True, False]  # 3 + 3 batched, the last task alone
    torch.testing.assert_close(actual, looped_reference(z, grads, params))
    with pytest.raises(ValueError, match="chunk_size"):
        parameter_jacobian(z, grads, params, chunk_size=0)


class ItemInBackward(torch.autograd.Function):
    """Doubles its input; its backward calls ``.item()``, which vmap cannot batch."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * (2.0 if grad.sum().item() == grad.sum().item() else 0.0)


class Unbatchable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ItemInBackward.apply(self.linear(x))


def test_vmap_failure_falls_back_to_the_loop_with_one_warning() -> None:
    """A backward that vmap cannot batch: the same Jacobian by the loop, a warning the first time only; the
    failure is remembered in the route given (one per wrapper), nowhere else."""
    torch.manual_seed(0)
    backbone = Unbatchable()
    params = list(backbone.parameters())
    grads = torch.randn(3, 5, 3)
    z = backbone(torch.randn(5, 4))
    route = JacobianRoute()
    with pytest.warns(RuntimeWarning, match="batched .vmapped. Jacobian failed.*Said once per wrapper"):
        first = parameter_jacobian(z, grads, params, route=route, chunk_size=3)
    torch.testing.assert_close(first, looped_reference(z, grads, params))
    assert route.vmap_failed is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = parameter_jacobian(backbone(torch.randn(5, 4)), grads, params, route=route, chunk_size=3)
    assert second.shape == first.shape
    with pytest.warns(RuntimeWarning, match="Jacobian failed"):  # another route (wrapper) learns it afresh
        parameter_jacobian(backbone(torch.randn(5, 4)), grads, params, route=JacobianRoute(), chunk_size=3)


def test_the_vmap_fallback_is_scoped_to_the_wrapper() -> None:
    """Two wrappers of one backbone: the first's vmap failure warns once for it; the second warns for itself."""
    torch.manual_seed(0)
    backbone = Unbatchable()
    wrappers = [MTLWrapper(HardSharing(backbone, [nn.Linear(3, 1), nn.Linear(3, 1)]), "upgrad",
                           target="parameters", jacobian_chunk_size=2) for _ in range(2)]
    x = torch.randn(5, 4)
    for mtl in wrappers:
        with pytest.warns(RuntimeWarning, match="Jacobian failed"):
            mtl.backward([p.pow(2).mean() for p in mtl(x)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mtl.backward([p.pow(2).mean() for p in mtl(x)])


def test_parameter_lists_follow_structural_changes() -> None:
    """The parameter lists (mtlzoo.structure) never go stale: a new parameter, a replaced submodule, a frozen
    weight and a conversion that swaps parameter objects each show up at the next call, as in
    ``module.parameters()`` (the reference)."""
    from mtlzoo.structure import trainable_parameters

    heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])
    assert trainable_parameters(heads) == list(heads.parameters())
    heads[1] = nn.Linear(3, 2)
    assert trainable_parameters(heads) == list(heads.parameters())
    heads[0].scale = nn.Parameter(torch.ones(()))
    assert trainable_parameters(heads) == list(heads.parameters())
    heads[0].weight.requires_grad_(False)
    assert all(p is not heads[0].weight for p in trainable_parameters(heads))

    mtl = MTLWrapper(HardSharing(nn.Linear(3, 3), [nn.Linear(3, 1)]), "ls")
    before = trainable_parameters(mtl.backbone)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        mtl.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    after = trainable_parameters(mtl.backbone)
    assert all(p.dtype == torch.float64 for p in after)
    assert [id(p) for p in after] == [id(p) for p in mtl.backbone.parameters()] != [id(p) for p in before]


def test_all_finite_is_exact_where_its_sum_is_not() -> None:
    """all_finite over several tensors (the engine's one check per step) sums first: finite values whose
    sum overflows are still finite, and inf - inf (a NaN sum) is not (reference: torch.isfinite(t).all())."""
    from mtlzoo.linalg import all_finite

    huge = torch.full((4,), 3e38)
    assert all_finite(huge, torch.ones(2)) and bool(torch.isfinite(huge).all())
    assert not all_finite(torch.ones(2), torch.tensor([float("inf"), -float("inf")]))
    assert not all_finite(torch.ones(3), torch.tensor(float("nan")))
    assert all_finite(torch.full((3,), 6e4, dtype=torch.float16), torch.ones(()))
    assert all_finite()


def test_task_indices_made_in_inference_mode_serve_autograd_later() -> None:
    """The cached index tensor of a pattern of present tasks, first made under inference mode (a
    post-step evaluation there), must still index a tensor that autograd records (an inference
    tensor would raise when saved for backward)."""
    from mtlzoo.losses import task_indices

    with torch.inference_mode():
        indices = task_indices((0, 2, 5), torch.device("cpu"))
    weights = torch.ones(6, requires_grad=True)
    weights[indices].sum().backward()
    assert weights.grad is not None and weights.grad.tolist() == [1, 0, 1, 0, 0, 1]


def test_a_chunked_jacobian_needs_one_chunk_of_memory_beyond_itself() -> None:
    """parameter_jacobian in chunks writes each chunk's rows into the K x n matrix as they come: its peak
    stays below 1.5 Jacobians at K=16 with chunks of 2 and of 1 (concatenating the chunks at the end, as
    before, holds two Jacobians at once). Reference: the size of the result; torch's profiler for the peak."""
    from mtlzoo.harness.bench import peak_bytes

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64))
    x = torch.randn(4, 8)
    z = backbone(x)
    grads = torch.randn(16, *z.shape)
    params = list(backbone.parameters())
    size = 16 * sum(p.numel() for p in params) * 4
    result: list[torch.Tensor] = []
    for chunk in (1, 2):
        peak = peak_bytes(lambda chunk=chunk: result.append(parameter_jacobian(z, grads, params, chunk_size=chunk)))
        assert result[-1].shape == (16, size // 64)
        assert size <= peak < 1.5 * size, (chunk, peak / size)
