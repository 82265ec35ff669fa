"""GradNorm (Chen et al., ICML 2018): weights learned from gradient norms on the last shared layer."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.engine import last_layer as engine
from mtlzoo.protocol import StepInputs, Update
from mtlzoo.strategies.gradnorm import GradNorm, gradnorm_weight_gradient, loss_ratio_values
from tests.helpers import batch, mse_losses, small_model
from tests.strategies import _regression

WEIGHTS = torch.tensor([0.5, 1.0, 1.5])


def test_worked_example_by_hand() -> None:
    """alpha = 1, g = ((3, 4), (0, 1)) (norms 5 and 1). Step 0, L = L(0) = (2, 1): r = (1, 1), G = (5, 1), targets
    mean(G) r = (3, 3), L_grad = 2 + 2, dL_grad/dw = (+5, -1). SGD (lr 0.1) gives w = (0.5, 1.1), renormalised to sum 2:
    (0.625, 1.375). Step 1, L = (1, 1): ratios (1/2, 1), r = (2/3, 4/3), G = (3.125, 1.375), targets 2.25 r = (1.5, 3),
    L_grad = 1.625 + 1.625; the update is w . g = (1.875, 3.875)."""
    gradnorm = GradNorm(2, alpha=1.0)
    optimizer = torch.optim.SGD(gradnorm.parameters(), lr=0.1)
    grads = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    torch.testing.assert_close(gradnorm.aggregate(grads, torch.tensor([2.0, 1.0])), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(gradnorm.task_weights.grad, torch.tensor([5.0, -1.0]))
    optimizer.step()
    gradnorm.advance()
    torch.testing.assert_close(gradnorm.task_weights.detach(), torch.tensor([0.625, 1.375]))
    torch.testing.assert_close(gradnorm.initial_losses, torch.tensor([2.0, 1.0]))
    optimizer.zero_grad()
    direction = gradnorm.aggregate(grads, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(direction, torch.tensor([1.875, 3.875]))
    objective = gradnorm.objective(torch.tensor([3.125, 1.375]), torch.tensor([1.0, 1.0]), torch.arange(2))
    torch.testing.assert_close(objective.detach(), torch.tensor(3.25))


def spy_norms(strategy: GradNorm) -> list[torch.Tensor]:
    """Record the norms the engine hands the strategy."""
    seen: list[torch.Tensor] = []
    compute = strategy.compute

    def recording(inputs: StepInputs) -> Update:
        assert inputs.norms is not None
        seen.append(inputs.norms.clone())
        return compute(inputs)

    strategy.compute = recording  # type: ignore[method-assign]
    return seen


def autograd_norms(model: mtlzoo.HardSharing, x: torch.Tensor, targets: torch.Tensor, params: list[torch.Tensor],
                   weights: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The reference: ||d(w_k L_k)/dθ|| on the chosen parameters, one plain autograd.grad per task."""
    losses = mse_losses(model(x, **kwargs), targets)
    rows = [torch.autograd.grad(w * loss, params, retain_graph=True) for w, loss in zip(weights, losses)]
    return torch.stack([torch.cat([g.flatten() for g in row]).norm() for row in rows])


def norms_through_the_wrapper(model: mtlzoo.HardSharing, x: torch.Tensor, targets: torch.Tensor, **kwargs: Any
                              ) -> torch.Tensor:
    strategy = GradNorm(3, alpha=1.5, **kwargs)
    with torch.no_grad():
        strategy.task_weights.copy_(WEIGHTS)
    seen = spy_norms(strategy)
    mtl = mtlzoo.MTLWrapper(model, strategy)
    mtl.backward(mse_losses(mtl(x), targets))
    return seen[0]


def test_norms_on_a_linear_last_layer_equal_autograd_without_any_extra_backward(monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    """Default layer: the last shared layer's weight W (z = h W^T + b). Equal to plain autograd of w_k L_k on W, and
    computed from dL_k/dz and h alone: the Jacobian route is never taken."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(3)
    expected = autograd_norms(model, x, targets, [model.backbone[2].weight], WEIGHTS)

    def no_jacobian(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the linear route should not form a Jacobian")

    monkeypatch.setattr(engine, "parameter_jacobian", no_jacobian)
    torch.testing.assert_close(norms_through_the_wrapper(model, x, targets), expected)


def spy_factoring(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per call of the engine's factored norms, whether they were taken (``True``) or refused."""
    calls: list[bool] = []
    factored_norms = engine._factored_weight_norms

    def spy(*args: Any) -> Any:
        result = factored_norms(*args)
        calls.append(result is not None)
        return result
    monkeypatch.setattr(engine, "_factored_weight_norms", spy)
    return calls


class Hooked(nn.Linear):
    """A linear layer the engine must not read through (a subclass)."""


def hooked_head() -> nn.Module:
    head = nn.Linear(4, 1)
    head.register_forward_hook(lambda module, args, output: output)
    return head


def singular_head() -> nn.Module:
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight[1] = head.weight[0]  # V V^T singular: D_k cannot be recovered
    return head


@pytest.mark.parametrize(("make_head", "factored"), [
    (lambda: nn.Linear(4, 1), True),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)), True),
    (lambda: nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 1)), False),  # wider than FACTORED_WIDTH
    (lambda: nn.Sequential(nn.Tanh(), nn.Linear(4, 1)), False),
    (lambda: Hooked(4, 1), False),
    (hooked_head, False),
    (singular_head, False),
], ids=["linear", "sequential", "wide", "not first", "subclass", "hook", "singular"])
def test_norms_factored_through_linear_heads_equal_autograd(make_head: Any, factored: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that reads z through a plain linear layer V_k (o outputs) alone: G_k = D_k V_k, and the norms on W come
    from ||V_k^T (D_k^T h)|| without the K (d x m) products. Reference: plain autograd of w_k L_k on W, for the factored
    heads and for those that must take the product route (a wide, non-leading, subclassed, hooked or rank-deficient
    layer); a factoring that dropped V_k V_k^T, or read D_k as G_k V_k^T, fails."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    model = mtlzoo.HardSharing(backbone, [make_head() for _ in range(3)])
    x, targets = batch(3)
    expected = autograd_norms(model, x, targets, [backbone[2].weight], WEIGHTS)
    calls = spy_factoring(monkeypatch)
    torch.testing.assert_close(norms_through_the_wrapper(model, x, targets), expected, rtol=1e-5, atol=1e-7)
    assert calls == [factored]


def test_norms_under_autocast_take_the_product_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the head read a rounded copy of V_k, so G_k = D_k V_k no longer holds to float32
    precision: the norms come from the products h^T G_k (the factored route is refused)."""
    calls = spy_factoring(monkeypatch)
    torch.manual_seed(0)
    model = mtlzoo.HardSharing(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)),
                               [nn.Linear(4, 1) for _ in range(3)])
    mtl = mtlzoo.MTLWrapper(model, "gradnorm", alpha=1.5)
    x, targets = batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = mtl(x)
    mtl.backward([loss.float() for loss in mse_losses(predictions, targets)])
    assert calls == [False]


def test_factored_norms_train_like_the_product_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five GradNorm steps with linear heads: the factored route (no per-task products kept, W's gradient by the
    ordinary backward) and the product route give the same weights and model, to rounding."""
    results = []
    for factor in (True, False):
        if not factor:
            monkeypatch.setattr(engine, "FACTORED_WIDTH", 0)
        torch.manual_seed(0)
        model = mtlzoo.HardSharing(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)),
                                   [nn.Linear(4, 1) for _ in range(3)])
        mtl = mtlzoo.MTLWrapper(model, "gradnorm", alpha=1.5)
        optimizer = torch.optim.SGD([{"params": list(mtl.model_parameters())},
                                     {"params": mtl.strategy_parameters(), "lr": 0.05}], lr=0.05)
        for step in range(5):
            x, targets = batch(3, seed=step)
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
        results.append(mtl)
    torch.testing.assert_close(results[0].strategy.task_weights, results[1].strategy.task_weights)
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(a, b)


def test_norms_on_a_convolutional_last_layer_equal_autograd() -> None:
    """A backbone ending in a convolution: its weight is the default layer, through the Jacobian restricted to it."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3))
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1)) for _ in range(3)]
    model = mtlzoo.HardSharing(backbone, heads)
    x, targets = torch.randn(5, 2, 8, 8), torch.randn(3, 5, 1)
    assert engine.last_layer_parameters(backbone(x)) == [backbone[2].weight]
    expected = autograd_norms(model, x, targets, [backbone[2].weight], WEIGHTS)
    torch.testing.assert_close(norms_through_the_wrapper(model, x, targets), expected)


@pytest.mark.parametrize(("layer", "names"), [
    ("0.weight", ["0.weight"]),  # not the last layer: the Jacobian restricted to it
    (("2.weight", "2.bias"), ["2.weight", "2.bias"]),  # the last layer with its bias: still the linear route
])
def test_norms_on_named_parameters_equal_autograd(layer: Any, names: list[str]) -> None:
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(3)
    named = dict(model.backbone.named_parameters())
    expected = autograd_norms(model, x, targets, [named[n] for n in names], WEIGHTS)
    torch.testing.assert_close(norms_through_the_wrapper(model, x, targets, layer=layer), expected)


def test_norms_on_the_representation_equal_autograd() -> None:
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(3)
    z = model.backbone(x)
    losses = mse_losses([head(z) for head in model.heads], targets)
    expected = torch.stack([torch.autograd.grad(w * loss, z, retain_graph=True)[0].norm()
                            for w, loss in zip(WEIGHTS, losses)])
    torch.testing.assert_close(norms_through_the_wrapper(model, x, targets, target="representation"), expected)


def test_layer_norms_sum_several_forwards_and_read_3d_linear_layers() -> None:
    """The engine alone: a linear layer applied to (batch, tokens, features), two forwards in one backward."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    inputs = [torch.randn(4, 3, 6), torch.randn(2, 3, 6)]
    zs = [layer(torch.tanh(i)) for i in inputs]
    grads = [torch.randn(3, *z.shape) for z in zs]
    params = [layer.weight, layer.bias]
    expected = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        zs, params, grad_outputs=[grads[0][k], grads[1][k]], retain_graph=True)]).norm() for k in range(3)])
    assert engine.linear_output(zs[0]) is not None
    torch.testing.assert_close(engine.layer_norms(zs, grads, params), expected)


def test_the_weights_learn_from_the_gradient_loss_only_and_are_renormalised() -> None:
    """Through MTLWrapper at step 0 (L = L(0), so r = 1 and alpha plays no part): dL_grad/dw_k = sign(G_k - mean G)
    ||dL_k/dW||, from plain autograd norms; nothing from sum_k w_k L_k. After the step, sum_k w_k = K."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch(3)
    unweighted = autograd_norms(model, x, targets, [model.backbone[2].weight], torch.ones(3))
    strategy = GradNorm(3, alpha=1.5)
    with torch.no_grad():
        strategy.task_weights.copy_(WEIGHTS)
    mtl = mtlzoo.MTLWrapper(model, strategy)
    optimizer = torch.optim.SGD([{"params": list(mtl.model_parameters())},
                                 {"params": mtl.strategy_parameters(), "lr": 0.1}], lr=0.0)
    mtl.backward(mse_losses(mtl(x), targets))
    weighted = WEIGHTS * unweighted
    torch.testing.assert_close(strategy.task_weights.grad, torch.sign(weighted - weighted.mean()) * unweighted)
    mtl.step(optimizer)
    torch.testing.assert_close(strategy.task_weights.detach().sum(), torch.tensor(3.0))


def test_hyperparameters_are_checked() -> None:
    with pytest.raises(ValueError, match="`alpha`"):
        GradNorm(3, alpha=-1.0)
    with pytest.raises(ValueError, match="`target`"):
        GradNorm(3, alpha=1.0, target="heads")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`layer`"):
        GradNorm(3, alpha=1.0, layer="2.weight", target="representation")


def test_on_the_regression_it_moves_the_norms_to_their_targets() -> None:
    """The paper's aim: the learned weights bring the weighted norms w_k ||dL_k/dW|| towards mean(G) r_k^alpha, so at
    the last step L_grad is far below its value at equal weights (the raw norms, which the loss scales 1 to 1e4 set
    orders of magnitude apart); the largest-scale task's weight falls below 1, and sum_k w_k = K."""
    strategy = GradNorm(3, alpha=1.5)
    seen = spy_norms(strategy)
    run = _regression.train(strategy)
    weights, losses, tasks = run.weights[-1], run.losses[-1], torch.arange(3)
    weighted = seen[-1]
    equal = GradNorm(3, alpha=1.5)
    equal.initial_losses = strategy.initial_losses.clone()
    learned = float(strategy.objective(weighted, losses, tasks).detach())
    at_equal_weights = float(equal.objective(weighted / weights, losses, tasks).detach())
    assert learned < 0.5 * at_equal_weights, (learned, at_equal_weights)
    assert float(weights[2]) < 1
    torch.testing.assert_close(strategy.task_weights.detach().sum(), torch.tensor(3.0))


@pytest.mark.parametrize("case", ["plain", "no_bias", "input_requires_grad", "frozen_weight", "two_forwards"])
def test_the_model_gets_the_weighted_gradients_through_the_last_layer_shortcut(case: str) -> None:
    """On a linear last layer the engine reuses the norms' per-task products for W's gradient and goes on
    from the layer's input, instead of back-propagating dz through the layer. Reference: plain autograd
    of sum_k w_k L_k on a copy (w = GradNorm's weights [0.5, 1, 1.5]), on every parameter and the input.
    A W gradient summed from the wrong products, a missing bias or input gradient, or a frozen W that
    still moves fails it; two forwards in one backward take the ordinary route and must agree too."""
    torch.manual_seed(0)
    model = small_model()
    if case == "no_bias":
        model.backbone[2] = nn.Linear(8, 4, bias=False)
    if case == "frozen_weight":
        model.backbone[2].weight.requires_grad_(False)
    reference = copy.deepcopy(model)
    x, targets = batch()
    mtl = mtlzoo.MTLWrapper(model, "gradnorm", alpha=1.0)
    with torch.no_grad():
        mtl.strategy.task_weights.copy_(WEIGHTS)
    inputs = [x.clone().requires_grad_(case == "input_requires_grad")]
    if case == "two_forwards":
        inputs.append(batch(seed=1)[0])
    losses = [torch.stack(mse_losses(mtl(xi), targets)) for xi in inputs]
    mtl.backward(list(sum(losses)))
    reference_inputs = [xi.detach().clone().requires_grad_(xi.requires_grad) for xi in inputs]
    total = sum((WEIGHTS * torch.stack(mse_losses(reference(xi), targets))).sum() for xi in reference_inputs)
    leaves = [p for p in reference.parameters() if p.requires_grad]
    leaves += [xi for xi in reference_inputs if xi.requires_grad]
    expected = torch.autograd.grad(total, leaves)
    actual = [p.grad for p in model.parameters() if p.requires_grad] + [xi.grad for xi in inputs if xi.requires_grad]
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)
    if case == "frozen_weight":
        assert model.backbone[2].weight.grad is None


@pytest.mark.parametrize("case", ["referenced", "first_step", "absent_task", "negative_losses", "tie"])
def test_the_weight_gradient_is_the_papers_closed_form(case: str) -> None:
    """GradNorm's weights get dL_grad/dw_k = sign(w_k n_k - target_k) n_k, target_k = mean(G) r_k^alpha (the
    paper's Algorithm 1 with the targets held constant), written out by hand here on host floats; 0 at a tie
    (|x| at 0) and where a negative ratio to a fractional alpha makes the target NaN. RotoGradNorm's host face
    gradnorm_weight_gradient gives the same numbers."""
    gradnorm = GradNorm(3, alpha=1.5)
    with torch.no_grad():
        gradnorm.task_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    tasks = torch.arange(3)
    losses = torch.tensor([0.9, 2.0, 0.3])
    norms = torch.tensor([0.4, 2.5, 1.2])
    if case != "first_step":
        gradnorm.initial_losses = torch.tensor([1.0, 1.5, 0.6])
    if case == "absent_task":
        tasks, losses, norms = torch.tensor([0, 2]), losses[[0, 2]], norms[[0, 2]]
    if case == "negative_losses":
        losses = torch.tensor([-0.9, 2.0, 0.3])
    if case == "tie":
        norms = torch.tensor([1.0, 1.0, 1.0]) * gradnorm.task_weights.detach()
        losses = torch.tensor([1.0, 1.5, 0.6])
    gradnorm.weights(losses, tasks)  # stages L(0) at a first step
    actual = torch.autograd.grad(gradnorm.objective(norms, losses, tasks), gradnorm.task_weights)[0][tasks]

    present = tasks.tolist()
    reference = gradnorm.state.initial_losses.tolist()
    ratios = [loss / reference[k] for k, loss in zip(present, losses.tolist())]
    mean_ratio = sum(ratios) / len(ratios)
    weights = [gradnorm.task_weights.tolist()[k] for k in present]
    target_norm = sum(norms.tolist()) / len(present)
    unweighted = [n / w for n, w in zip(norms.tolist(), weights)]
    expected = []
    for w, n, r in zip(weights, unweighted, ratios):
        target = target_norm * (r / mean_ratio) ** 1.5 if r / mean_ratio >= 0 else math.nan
        difference = w * n - target
        expected.append(0.0 if difference == 0 or math.isnan(difference) else math.copysign(n, difference))
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert sum(abs(value) for value in expected) > 0
    face = gradnorm_weight_gradient(weights, unweighted, ratios, target_norm, 1.5, 1e-38)
    torch.testing.assert_close(torch.tensor(face), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert loss_ratio_values(losses.tolist(), present, reference) == pytest.approx(ratios)


def test_under_an_aggregator_its_weights_follow_its_rule_on_the_derived_norms() -> None:
    """Issue 18: GradNorm's weights under an aggregator. With layer="all" it reads the norms on every shared
    parameter, so compose() asks the engine for UPGrad's Gramian once and hands GradNorm sqrt(diag(G)). Reference:
    the paper's dL_grad/dw_k = sign(w_k n_k - target) n_k at a first step (all ratios 1, target = mean_j w_j n_j),
    n_k = ||dL_k/dθ|| by plain autograd over the backbone's parameters."""
    torch.manual_seed(0)
    model = small_model()
    reference = copy.deepcopy(model)
    gradnorm = GradNorm(3, alpha=1.5, layer="all")
    strategy = mtlzoo.compose(weighting=gradnorm, aggregator="upgrad")
    assert strategy.request.where == "parameters" and strategy.request.parameters is None
    with torch.no_grad():
        gradnorm.task_weights.copy_(WEIGHTS)
    mtl = mtlzoo.MTLWrapper(model, strategy)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))

    shared = list(reference.backbone.parameters())
    norms = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]).norm()
                         for loss in mse_losses(reference(x), targets)])
    weighted = WEIGHTS * norms
    expected = torch.sign(weighted - weighted.mean()) * norms
    torch.testing.assert_close(gradnorm.task_weights.grad, expected, rtol=1e-4, atol=1e-6)


def test_under_an_aggregator_it_trains_and_renormalises() -> None:
    """Through MTLWrapper with Adam on the model and the weights: every loss falls, the weights move and sum to K."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), mtlzoo.compose(weighting=GradNorm(3, alpha=1.5, layer="all"),
                                                          aggregator="upgrad"))
    x, targets = batch(3, seed=0)
    before = torch.stack(mse_losses(mtl(x), targets)).detach()
    optimizer = torch.optim.Adam([{"params": list(mtl.model_parameters())},
                                  {"params": mtl.strategy_parameters(), "lr": 0.05}], lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        mtl.backward(mse_losses(mtl(x), targets))
        mtl.step(optimizer)
    after = torch.stack(mse_losses(mtl(x), targets)).detach()
    assert bool((after < before).all()), (before, after)
    weights = mtl.strategy.weighting.task_weights.detach()
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0))
    assert float((weights - 1).abs().max()) > 0.05


@pytest.mark.parametrize(("kwargs", "aggregator"), [({}, "upgrad"), ({"target": "representation"}, "upgrad"),
                                                    ({"layer": "all"}, "mgda:target=representation")])
def test_under_an_aggregator_reading_elsewhere_it_is_refused_clearly(kwargs: dict, aggregator: str) -> None:
    """The default (the last shared layer, the paper's) or another target than the aggregator's: one step computes
    one statistic on one target, so compose() refuses, naming both parts and where each reads."""
    name, _, option = aggregator.partition(":")
    options = dict([option.split("=")]) if option else {}
    with pytest.raises(mtlzoo.errors.InvalidStrategyError, match=r"GradNorm reads .* reads"):
        mtlzoo.compose(weighting=GradNorm(3, alpha=1.5, **kwargs),
                       aggregator=mtlzoo.create(name, num_tasks=3, **options))


def test_under_an_aggregator_on_the_representation() -> None:
    """target="representation" matches an aggregator built on z: the composite reads the gradients on z."""
    strategy = mtlzoo.compose(weighting=GradNorm(3, alpha=1.5, target="representation"),
                              aggregator=mtlzoo.create("upgrad", num_tasks=3, target="representation"))
    assert strategy.request.where == "representation"
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.weighting.task_weights.grad is not None


def test_by_name_under_an_aggregator_it_takes_its_suggestions_and_says_how_to_match() -> None:
    """compose(weighting="gradnorm", aggregator="upgrad", num_tasks=K): by name GradNorm is built as the harness
    builds it (its suggested alpha), on its default last shared layer; the error says how to match the aggregator."""
    with pytest.raises(mtlzoo.errors.InvalidStrategyError, match=r"GradNorm reads .*layer='all'"):
        mtlzoo.compose(weighting="gradnorm", aggregator="upgrad", num_tasks=3)
    strategy = mtlzoo.compose(weighting=GradNorm(3, alpha=1.5, layer="all"), aggregator="upgrad", num_tasks=3)
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    assert strategy.weighting.task_weights.grad is not None
