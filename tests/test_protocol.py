"""Requests, the engine on its own (no wrapper), and the step lifecycle's hooks (issue 6)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine.forwards import ForwardRecord
from mtlzoo.engine.heads import head_pass
from mtlzoo.engine.statistics import statistics
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles import WeightingStrategy
from mtlzoo.strategy import StrategyInfo
from tests.helpers import batch, mse_losses, small_model


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"where": "weights"}, "where"),
    ({"statistic": "hessian"}, "statistic"),
    ({"where": "representation", "parameters": ("0.weight",)}, "parameters"),
    ({"where": "parameters", "parameters": "0.weight"}, "parameters"),
    ({"batches": 0}, "batches"),
    ({"where": "parameters", "parameters": ()}, "parameters"),  # an empty tuple no longer means "last layer"
    ({"where": "representation", "layer": "last"}, "layer"),
    ({"where": "parameters", "layer": "first"}, "layer"),
    ({"where": "parameters", "parameters": ("0.weight",), "layer": "last"}, "layer"),
])
def test_invalid_requests_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"Parameter `{message}` should be"):
        Request(**kwargs)


def test_the_last_layer_is_requested_by_name() -> None:
    """Issue 18: ``layer="last"`` names the last shared layer; ``LAST_LAYER`` (not an empty tuple) still says it."""
    from mtlzoo.protocol import LAST_LAYER

    request = Request("parameters", "norms", layer="last")
    assert request.parameters is None and str(request) == "norms on the last shared layer"
    assert Request("parameters", "norms", parameters=LAST_LAYER) == request
    assert LAST_LAYER != () and repr(LAST_LAYER) == "LAST_LAYER"
    assert eval(repr(request)) == request and "layer='last'" in repr(request)
    assert "layer" not in repr(Request("parameters"))  # the repr strategies' doctests show is unchanged


@pytest.mark.parametrize("statistic", ["gradients", "gramian", "norms"])
def test_every_statistic_reads_on_the_last_layer(statistic: str) -> None:
    """The last layer's statistics equal per-task autograd on the last linear layer's weight alone."""
    class Reader(WeightingStrategy):
        info = StrategyInfo(name=f"test_last_layer_{statistic}", kind="weighting", summary="reads the last layer",
                            request=Request("parameters", statistic, layer="last"))
        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(losses)

        def compute(self, inputs: StepInputs) -> Update:
            seen.append(inputs)
            return Update()

    seen: list[StepInputs] = []

    torch.manual_seed(0)
    model = small_model()
    x, targets = batch()
    weight = model.backbone[2].weight
    rows = torch.stack([torch.autograd.grad(loss, weight, retain_graph=True)[0].flatten()
                        for loss in mse_losses(model(x), targets)])
    mtl = mtlzoo.MTLWrapper(model, Reader(3))
    mtl.backward(mse_losses(mtl(x), targets))
    inputs = seen[-1]
    expected = {"gradients": rows, "gramian": rows @ rows.T, "norms": rows.norm(dim=1)}[statistic]
    torch.testing.assert_close(getattr(inputs, statistic), expected)


def test_request_text_and_legacy_needs() -> None:
    assert str(Request()) == "losses" and not Request().needs_gradients
    assert str(Request("parameters", "norms", ("2.weight",))) == "norms on parameters ['2.weight']"
    info = StrategyInfo(name="x", kind="surgery", summary="x", needs="parameter_jacobian")
    assert info.request == Request("parameters") and info.needs == "gradients on parameters"
    with pytest.raises(ValueError, match="needs"):
        StrategyInfo(name="x", kind="surgery", summary="x", needs="jacobian")


def engine_step(request: Request) -> tuple[StepInputs, torch.Tensor, nn.Module, list[nn.Module], torch.Tensor]:
    """Drive the engine by hand: a backbone, two heads on detached leaves, one record."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    heads = [nn.Linear(4, 1), nn.Linear(4, 1)]
    x, targets = batch(2)
    z = backbone(x)
    leaves = [z.detach().requires_grad_() for _ in heads]
    record = ForwardRecord.create(z, leaves)
    losses = torch.stack([((head(leaf) - t) ** 2).mean() for head, leaf, t in zip(heads, leaves, targets)])
    tasks = torch.arange(2)
    passed = head_pass([record], losses, tasks, [True, True], [p for h in heads for p in h.parameters()],
                              labels=["0", "1"])
    inputs = StepInputs(losses.detach(), tasks, 2)
    shared = list(backbone.parameters())
    rep = statistics(request, passed, shared, inputs, None).rep
    plain = torch.stack([((h(backbone(x)) - t) ** 2).mean() for h, t in zip(heads, targets)])
    per_task = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                            for loss in plain])
    return inputs, rep, backbone, heads, per_task


def test_the_engine_fulfils_each_statistic_without_a_wrapper() -> None:
    """Gradients, Gramian and norms on the parameters equal per-task autograd; nothing reached .grad yet."""
    inputs, _, backbone, heads, per_task = engine_step(Request("parameters"))
    torch.testing.assert_close(inputs.gradients, per_task)
    assert all(p.grad is None for module in (backbone, *heads) for p in module.parameters())
    inputs, _, _, _, per_task = engine_step(Request("parameters", "gramian"))
    torch.testing.assert_close(inputs.gramian, per_task @ per_task.T)
    inputs, rep, _, _, per_task = engine_step(Request("representation", "norms"))
    torch.testing.assert_close(inputs.norms, rep.flatten(1).norm(dim=1))


class Recorder(WeightingStrategy):
    """Records the lifecycle calls it receives."""

    info = StrategyInfo(name="test_recorder", kind="weighting", summary="records")
    wants_post_step_losses = True

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks)
        self.calls: list[str] = []
        self.after: list[torch.Tensor] = []

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)

    def on_advance(self) -> None:
        self.calls.append("advance")

    def discard(self) -> None:
        super().discard()
        self.calls.append("discard")

    def end_epoch(self) -> None:
        self.calls.append("epoch")

    def post_step(self, losses: torch.Tensor) -> None:
        self.after.append(losses)


def test_the_documented_loop_calls_each_hook_once() -> None:
    strategy = Recorder(3)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    x, targets = batch()
    for _ in range(2):
        optimizer.zero_grad()
        before = torch.stack(mse_losses(mtl(x), targets))
        mtl.backward(list(before))
        assert mtl.step(optimizer, post_step_losses=lambda: mse_losses(mtl(x), targets))
    mtl.end_epoch()
    assert strategy.calls == ["advance", "advance", "epoch"]
    assert len(strategy.after) == 2 and not strategy.after[0].requires_grad
    assert bool((strategy.after[1] < before.detach()).all())  # evaluated after the step: lower losses
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets))
    with pytest.warns(RuntimeWarning, match="post_step_losses"):
        mtl.step(optimizer)


def test_a_plain_optimizer_step_is_noticed_at_the_next_backward_with_one_warning() -> None:
    """A plain optimizer.step() is seen locally at the next mtl.backward (the parameters moved since the last
    backward, no mtl.step ran): the state advances once per such step, with one warning naming mtl.step."""
    strategy = Recorder(3)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.1)
    x, targets = batch()
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets))
    optimizer.step()
    assert strategy.calls == []  # nothing happens at the step itself: no hook
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"mtl.step\(optimizer\)"):
        mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.calls == ["advance"]
    optimizer.step()
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets))  # said once: a second warning would be an error here
    assert strategy.calls == ["advance", "advance"]
    mtl.backward(mse_losses(mtl(x), targets))  # accumulation: the parameters did not move, nothing advances
    assert strategy.calls == ["advance", "advance"]
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    other.step()  # an optimizer of other parameters does not advance this wrapper
    mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.calls == ["advance", "advance"]
    assert mtl.step(optimizer, post_step_losses=lambda: mse_losses(mtl(x), targets))
    assert strategy.calls == ["advance", "advance", "advance"]
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets))  # after mtl.step, the parameters' change is not a plain step
    assert strategy.calls == ["advance", "advance", "advance"]


@pytest.mark.parametrize("frozen_first_layer", [False, True])
def test_a_plain_step_after_a_backward_without_the_first_task_is_noticed(frozen_first_layer: bool) -> None:
    """The check watches a parameter the backward gave a gradient to: a head of a present task, and a trainable one
    (the first head gets no gradient when its task is absent, so a plain SGD step leaves it where it was)."""
    strategy = Recorder(3)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    if frozen_first_layer:
        mtl.heads[1][0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in mtl.parameters() if p.requires_grad], lr=0.1)
    x, targets = batch()
    losses = mse_losses(mtl(x), targets)
    mtl.backward([None, losses[1], losses[2]])
    optimizer.step()
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"mtl.step\(optimizer\)"):
        mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.calls == ["advance"]


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.1),
    lambda params: torch.optim.Adam(params, lr=0.1, foreach=False),
    lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1),
], ids=["sgd-momentum", "adam-foreach", "adam-loop", "adamw"])
def test_a_plain_step_of_every_optimizer_implementation_is_noticed(make: Any) -> None:
    """Plain and foreach updates move the parameters' version counters the check reads (a fused one does not:
    the lifecycle's docstring says so)."""
    strategy = Recorder(3)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    optimizer = make(list(mtl.parameters()))
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    optimizer.step()
    with pytest.warns(RuntimeWarning, match=r"mtl.step\(optimizer\)"):
        mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.calls == ["advance"]


def test_no_process_wide_hook_is_installed() -> None:
    """Issue 18: neither a global optimizer hook nor a global module hook anywhere in the package."""
    package = Path(mtlzoo.__file__).parent
    banned = ("register_optimizer_step_post_hook", "register_optimizer_step_pre_hook", "register_module_forward",
              "register_module_full_backward", "register_module_backward", "register_module_parameter_registration",
              "register_module_buffer_registration", "register_module_module_registration")
    found = [f"{path.relative_to(package)}: {name}" for path in sorted(package.rglob("*.py"))
             for name in banned if name in path.read_text()]
    assert found == []


def test_a_standalone_strategy_advances_when_told() -> None:
    strategy = mtlzoo.create("rotograd", num_tasks=2, rotation_shape=3, burn_in_period=1)
    grads = torch.randn(2, 4, 3)
    strategy.aggregate(grads, torch.ones(2))
    assert strategy.step == 0 and strategy.micro_batch == 1
    strategy.advance()
    assert strategy.step == 1 and strategy.micro_batch == 0
    torch.testing.assert_close(strategy.initial_grad_norms, grads.flatten(1).norm(dim=1))
    strategy.aggregate(10 * grads, torch.ones(2))  # step 1 = burn_in_period: a reference step, staged
    strategy.discard()
    assert strategy.step == 1
    torch.testing.assert_close(strategy.initial_grad_norms, grads.flatten(1).norm(dim=1))


class TwoBatchGramian(mtlzoo.GradientSurgery):
    """Weights from a second, independent batch: c_k = 1 / ||g'_k||, applied to the first batch's gradients."""

    info = StrategyInfo(name="test_two_batches", kind="surgery", summary="two batches",
                        request=Request("parameters", "gramian", batches=2))

    def compute(self, inputs: StepInputs) -> mtlzoo.Update:
        (other,) = inputs.extra
        return mtlzoo.Update(weights=other.gramian.diagonal().rsqrt())


def test_a_strategy_reads_independent_batches() -> None:
    """Issue 6: a request names how many independent batches it reads (SDMGrad, MoDo). Issue 21: given fewer, the
    given batch stands in for the missing one, said once in a ReusedBatchWarning; given more, a clear error."""
    torch.manual_seed(0)
    model = small_model()
    mtl = mtlzoo.MTLWrapper(model, TwoBatchGramian(3, target="parameters"))
    (xa, ta), (xb, tb) = batch(seed=1), batch(seed=2)
    shared = list(model.backbone.parameters())

    def rows(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = [((head(model.backbone(x)) - t) ** 2).mean() for head, t in zip(model.heads, targets)]
        return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared)]) for loss in losses])

    def grad() -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in shared])

    with pytest.warns(mtlzoo.errors.ReusedBatchWarning, match="2 independent batches per backward, 1 given"):
        mtl.backward(mse_losses(mtl(xa), ta))
    torch.testing.assert_close(grad(), rows(xa, ta).norm(dim=1).reciprocal() @ rows(xa, ta))
    mtl.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        mtl.backward(mse_losses(mtl(xa), ta))
    mtl.zero_grad()
    losses_a, losses_b = mse_losses(mtl(xa), ta), mse_losses(mtl(xb), tb)
    with pytest.raises(mtlzoo.errors.BackwardOrderError, match="at most 1"):
        mtl.backward(losses_a, more_batches=[losses_b, losses_b])
    mtl.backward(losses_a, more_batches=[losses_b])
    assert len(mtl._pending) == 0
    weights = rows(xb, tb).norm(dim=1).reciprocal()
    torch.testing.assert_close(grad(), weights @ rows(xa, ta))


def test_plain_bookkeeping_attributes_bypass_only_plain_attributes() -> None:
    """Strategy.__setattr__ sets micro_batch, step and _staged past nn.Module's checks once they are plain
    attributes; a buffer of one of those names stays a buffer (a tensor assigned reaches state_dict), and a
    module assigned is still registered."""

    class Counting(WeightingStrategy):
        info = StrategyInfo(name="counting_test", kind="weighting", summary="test")

        def __init__(self, num_tasks: int) -> None:
            super().__init__(num_tasks)
            self.register_buffer("step", torch.zeros(()))
            self._staged = {}

        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(losses)

    strategy = Counting(2)
    strategy.micro_batch = 3
    strategy._staged = {"sums": None}
    assert strategy.micro_batch == 3 and strategy._staged == {"sums": None}
    strategy.step = torch.tensor(5.0)
    assert float(strategy.state_dict()["step"]) == 5.0 and "step" not in vars(strategy)
    strategy._staged = nn.Linear(1, 1)
    assert "_staged" in dict(strategy.named_children())
