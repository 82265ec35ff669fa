"""MTLWrapper: forward outputs, parts, modes, state, and the three backward paths of the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.errors import BackwardOrderError, InvalidModelError, NotMaterializedError
from mtlzoo.roles import GradientSurgery, GramianWeightedSurgery
from mtlzoo.strategy import StrategyInfo
from tests.helpers import batch, mse_losses, small_model


class SumSurgery(GradientSurgery):
    """Sums the task gradients: on either target it must reproduce plain summed-loss training."""

    info = StrategyInfo(name="test_sum", kind="surgery", needs="representation_grads", summary="sum")

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return grads.sum(0)


class UnitGramian(GramianWeightedSurgery):
    info = StrategyInfo(name="test_unit", kind="surgery", needs="parameter_jacobian", summary="ones")

    def gramian_weights(self, gramian: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones(gramian.shape[0])


def gradients(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


def one_backward(model: nn.Module, strategy: str | mtlzoo.Strategy, backbone_loss: bool = False) -> list:
    mtl = mtlzoo.MTLWrapper(model, strategy)
    x, targets = batch()
    predictions = mtl(x)
    extra = 0.1 * sum(p.pow(2).sum() for p in model.backbone.parameters()) if backbone_loss else None
    mtl.backward(mse_losses(predictions, targets), backbone_loss=extra)
    return gradients(model)


@pytest.mark.parametrize("backbone_loss", [False, True])
def test_all_paths_agree_with_summed_loss_training(backbone_loss: bool) -> None:
    """The engine's representation and Jacobian paths reproduce one ordinary backward of sum_k L_k."""
    model = small_model()
    expected = one_backward(copy.deepcopy(model), "ls", backbone_loss)
    x, targets = batch()
    plain = copy.deepcopy(model)
    total = sum(mse_losses(plain(x), targets))
    if backbone_loss:
        total = total + 0.1 * sum(p.pow(2).sum() for p in plain.backbone.parameters())
    total.backward()
    for a, b in zip(expected, gradients(plain)):
        torch.testing.assert_close(a, b)
    for strategy in [SumSurgery(3), SumSurgery(3, target="parameters"), UnitGramian(3),
                     UnitGramian(3, target="representation")]:
        for a, b in zip(one_backward(copy.deepcopy(model), strategy, backbone_loss), expected):
            torch.testing.assert_close(a, b)


def test_batched_and_looped_jacobian_agree() -> None:
    from mtlzoo.engine.jacobian import parameter_jacobian

    backbone = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    z = backbone(torch.randn(6, 5))
    grads = torch.randn(3, 6, 4)
    params = list(backbone.parameters())
    batched = parameter_jacobian(z, grads, params, batched=True)
    looped = parameter_jacobian(z, grads, params, batched=False)
    assert batched.shape == (3, sum(p.numel() for p in params))
    torch.testing.assert_close(batched, looped)
    row = torch.autograd.grad(z, params, grads[1], retain_graph=True)
    torch.testing.assert_close(batched[1], torch.cat([g.flatten() for g in row]))


def test_forward_returns_one_prediction_per_task() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "ls")
    predictions = mtl(torch.randn(2, 5))
    assert isinstance(predictions, list) and len(predictions) == 3 == len(mtl)
    named = mtlzoo.MTLWrapper(small_model(named=True), "rotograd")
    out = named(torch.randn(2, 5))
    assert list(out) == ["task0", "task1", "task2"] and out["task1"].shape == (2, 1)


class TupleBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.linear(x), "backbone-extra"


class TupleHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.linear(z), "head-extra"


def test_tuple_outputs_are_split_into_predictions_and_extras() -> None:
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(TupleBackbone(), [TupleHead(), nn.Linear(4, 1)]), "rotograd")
    predictions, extras = mtl(torch.randn(2, 5))
    assert [p.shape for p in predictions] == [(2, 1), (2, 1)]
    assert extras == ["backbone-extra", ("head-extra",)]
    named = mtlzoo.MTLWrapper(mtlzoo.HardSharing(TupleBackbone(), {"a": TupleHead(), "b": nn.Linear(4, 1)}), "ls")
    predictions, extras = named(torch.randn(2, 5))
    assert set(predictions) == {"a", "b"}
    assert extras == {"backbone": ("backbone-extra",), "a": ("head-extra",)}
    clash = mtlzoo.MTLWrapper(mtlzoo.HardSharing(TupleBackbone(), {"backbone": nn.Linear(4, 1)}), "ls")
    with pytest.raises(InvalidModelError, match="rename the task"):
        clash(torch.randn(2, 5))


def test_training_with_tuple_outputs_and_named_losses() -> None:
    """Extras pass through, and the gradients are those of plain training on the first elements (issue 7, item
    24: this test only checked that gradients existed)."""
    torch.manual_seed(0)
    model = mtlzoo.HardSharing(TupleBackbone(), {"a": TupleHead(), "b": TupleHead()})
    plain = copy.deepcopy(model)
    mtl = mtlzoo.MTLWrapper(model, "rotate_only", rotation_shape=4, rotation_init="identity")
    x = torch.randn(3, 5)
    predictions, _ = mtl(x)
    mtl.backward({"b": predictions["b"].pow(2).mean(), "a": 3 * predictions["a"].pow(2).mean()})
    z = plain.backbone(x)[0]
    total = 3 * plain.heads["a"](z)[0].pow(2).mean() + plain.heads["b"](z)[0].pow(2).mean()
    for ours, theirs in zip(model.parameters(), torch.autograd.grad(total, list(plain.parameters()))):
        torch.testing.assert_close(ours.grad, theirs)


def test_task_modules_run_end_to_end() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(named=True), "rotograd", rotation_shape=4).eval()
    x = torch.randn(2, 5)
    with torch.no_grad():
        out = mtl(x)
        for k, name in enumerate(["task0", "task1", "task2"]):
            torch.testing.assert_close(mtl[name](x), out[name])
            torch.testing.assert_close(mtl[k](x), out[name])
    with pytest.raises(KeyError, match="task9"):
        mtl["task9"]
    with pytest.raises(KeyError):
        mtl[3]


class PlainListModel(nn.Module):
    """A model whose heads are a plain Python list (not registered by the model itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(5, 4)
        self.heads = [nn.Linear(4, 1), nn.Linear(4, 1)]


def test_parts_are_registered_and_in_state_dict() -> None:
    mtl = mtlzoo.MTLWrapper(PlainListModel(), "rotograd", rotation_shape=4)
    keys = set(mtl.state_dict())
    assert {"backbone.weight", "heads.0.weight", "heads.1.bias"} <= keys
    assert any(key.startswith("strategy.adapter.bank.") for key in keys)
    assert "strategy._extra_state" in keys
    assert len(list(mtl.model_parameters())) == 6


def test_strategy_parameters_before_materialisation_raise_with_both_fixes() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd")
    with pytest.raises(NotMaterializedError, match="rotation_shape") as error:
        mtl.strategy_parameters()
    assert "forward" in str(error.value)
    mtl.zero_grad()  # a loop that zeroes gradients before its first forward keeps working
    mtl(torch.randn(2, 5))
    assert mtl.strategy.rotation_shape == (4,)
    assert [p.shape for p in mtl.strategy_parameters()] == [(6,)] * 3  # tangents: 4 x 3 / 2 entries, below the diagonal


def test_torch_module_api_works_before_materialisation() -> None:
    """Issue 7, item 5: parameters() must not raise before a lazily shaped strategy's first forward."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd")
    count = sum(p.numel() for p in mtl.parameters())
    assert count == sum(p.numel() for p in mtl.model_parameters())
    mtl.requires_grad_(False)
    assert not any(p.requires_grad for p in mtl.parameters())
    mtl.requires_grad_(True)
    torch.nn.utils.clip_grad_norm_(mtl.parameters(), 1.0)


def test_an_optimizer_without_the_strategy_parameters_is_named_at_step() -> None:
    """The guard moved from parameters() to mtl.step(): a strategy whose parameters no optimizer steps warns."""
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd")
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)  # built before the rotations exist
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    with pytest.warns(RuntimeWarning, match="in none of the optimizers"):
        mtl.step(optimizer)


def test_eval_mode_records_nothing_and_refuses_backward() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd").eval()
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    assert len(mtl._pending) == 0
    with pytest.raises(BackwardOrderError, match="train"):
        mtl.backward(losses)


def test_backward_needs_a_forward_of_the_same_step() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd")
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses)
    with pytest.raises(BackwardOrderError, match="forward"):
        mtl.backward(losses)


def test_moves_with_to_and_trains_in_double() -> None:
    mtl = mtlzoo.MTLWrapper(small_model(), "rotograd_norm", alpha=1.0).double()
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x.double()), targets.double()))
    assert mtl.strategy.rotations.dtype == torch.float64
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in mtl.strategy_parameters())


def test_invalid_models_and_strategies_are_refused() -> None:
    with pytest.raises(InvalidModelError, match="backbone"):
        mtlzoo.MTLWrapper(nn.Linear(2, 2), "ls")
    with pytest.raises(InvalidModelError, match="no heads"):
        mtlzoo.MTLWrapper(mtlzoo.HardSharing(nn.Linear(2, 2), []), "ls")
    with pytest.raises(ValueError, match="2 tasks"):
        mtlzoo.MTLWrapper(small_model(3), mtlzoo.create("ls", num_tasks=2))
    with pytest.raises(TypeError, match="instance"):
        mtlzoo.MTLWrapper(small_model(3), mtlzoo.create("ls", num_tasks=3), weights=[1, 2, 3])
    with pytest.raises(TypeError):
        mtlzoo.MTLWrapper(small_model(3), "rotograd", 4)  # extra positional arguments are not swallowed
    with pytest.raises(TypeError):
        mtlzoo.create("rotograd", num_tasks=2, rotation_shape=4, unknown_option=1)


def test_hard_sharing_runs_every_head() -> None:
    model = small_model(named=True)
    out = model(torch.randn(2, 5))
    assert list(out) == ["task0", "task1", "task2"]




@pytest.mark.parametrize("name", [entry.name for entry in mtlzoo.list_strategies()])
def test_a_model_already_on_its_device_takes_the_strategy_there(name: str) -> None:
    """Found in use (on a GPU): MTLWrapper(model.cuda(), "uw") left the strategy's state on the CPU and the first
    backward failed with a device mismatch. The strategy's parameters and buffers follow the model's one device
    ("meta" stands in for an accelerator here); a model spread over devices leaves the strategy where it is."""
    from tests.helpers import required_kwargs

    model = small_model(dim=4).to("meta")
    mtl = mtlzoo.MTLWrapper(model, name, **required_kwargs(name),
                            **({"rotation_shape": 4} if "rotation_shape" in mtlzoo.get_strategy(name).hyperparameters
                               else {}))
    state = [*mtl.strategy.parameters(), *mtl.strategy.buffers()]
    assert all(tensor.device.type == "meta" for tensor in state)
    split = small_model(dim=4)
    split.heads[0].to("meta")
    assert all(t.device.type == "cpu" for t in mtlzoo.MTLWrapper(split, "uw").strategy.parameters())
