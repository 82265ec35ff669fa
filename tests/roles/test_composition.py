"""compose() and the modifiers: strategies made of roles train, checkpoint and list like any other."""

from __future__ import annotations

import copy

import pytest
import torch

import mtlzoo
from mtlzoo.errors import InvalidStrategyError
from mtlzoo.roles import ClipNorm, EveryNSteps
from tests.helpers import batch, mse_losses, optimizer_for, small_model, train_steps


def test_compose_reports_its_roles_and_kind() -> None:
    weighted = mtlzoo.compose(weighting="uw", num_tasks=3)
    both = mtlzoo.compose(weighting="uw", aggregator="mgda", num_tasks=3)
    assert weighted.present_roles() == ("weighting",) and weighted.kind == "weighting"
    assert both.present_roles() == ("weighting", "aggregator") and both.kind == "surgery"
    assert both.request == mtlzoo.create("mgda", num_tasks=3).request


def test_compose_refuses_a_part_in_the_wrong_role_and_parts_that_read_different_places() -> None:
    with pytest.raises(InvalidStrategyError, match=r"`aggregator` should play the aggregator role.*uw"):
        mtlzoo.compose(aggregator="uw", num_tasks=3)
    gradnorm = mtlzoo.create("gradnorm", num_tasks=3, alpha=1.5)  # norms on the last shared layer
    mgda = mtlzoo.create("mgda", num_tasks=3, target="representation")
    with pytest.raises(InvalidStrategyError, match=r"different places.*GradNorm reads norms on the last shared layer"):
        mtlzoo.compose(weighting=gradnorm, aggregator=mgda)
    with pytest.raises(TypeError, match="num_tasks"):
        mtlzoo.compose(weighting="uw")
    with pytest.raises(ValueError, match="built for 2 tasks"):
        mtlzoo.compose(weighting=mtlzoo.create("uw", num_tasks=2), aggregator="mgda", num_tasks=3)


def test_a_weighting_under_an_aggregator_weighs_the_losses_then_aggregates_their_gradients() -> None:
    """Reference: the definition. The shared gradient is MGDA's combination of the gradients of w_k L_k (UW's
    weights w_k = exp(-s_k) / 2 at s != 0), and the heads learn from sum_k w_k L_k (MGDA's heads unweighted by its
    coefficients here: tests/strategies/test_weighted_heads.py checks the authors' weighting)."""
    torch.manual_seed(0)
    model = small_model()
    mgda = mtlzoo.create("mgda", num_tasks=3, weighted_heads=False)
    mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), mtlzoo.compose(weighting="uw", aggregator=mgda))
    with torch.no_grad():
        mtl.strategy.weighting.log_variances.copy_(torch.tensor([0.5, -1.0, 0.2]))
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    weights = mtl.strategy.weighting.weights(torch.ones(3))

    shared = [p for p in model.backbone.parameters()]
    losses = [w * loss for w, loss in zip(weights, mse_losses(model(x), targets))]
    rows = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                        for loss in losses])
    expected = mtlzoo.create("mgda", num_tasks=3).aggregate(rows, torch.ones(3))
    got = torch.cat([p.grad.flatten() for p in mtl.backbone.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    head_grads = torch.autograd.grad(sum(losses), list(model.heads.parameters()))
    for mine, theirs in zip([p.grad for p in mtl.heads.parameters()], head_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_a_composite_trains_accumulates_and_resumes_bit_for_bit() -> None:
    def build() -> tuple[mtlzoo.MTLWrapper, torch.optim.Optimizer]:
        torch.manual_seed(1)
        strategy = mtlzoo.compose(weighting="dwa", aggregator=EveryNSteps(mtlzoo.create("upgrad", num_tasks=3), 2))
        mtl = mtlzoo.MTLWrapper(small_model(), strategy)
        return mtl, optimizer_for(mtl)

    mtl, optimizer = build()
    train_steps(mtl, optimizer, steps=3, epoch_every=2)
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    assert {"strategy.aggregator._extra_state", "strategy.aggregator.inner._extra_state",
            "strategy.weighting.loss_sums"} <= set(checkpoint["model"])
    train_steps(mtl, optimizer, steps=4, first_seed=50, epoch_every=2)

    resumed, resumed_optimizer = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, resumed_optimizer, steps=4, first_seed=50, epoch_every=2)
    for (name, a), b in zip(mtl.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert resumed.strategy.aggregator.state.steps == mtl.strategy.aggregator.state.steps == 7


def test_a_checkpoint_of_other_parts_is_refused_naming_the_setting() -> None:
    saved = mtlzoo.compose(aggregator=mtlzoo.create("upgrad", num_tasks=2, reg_eps=1e-4)).state_dict()
    other = mtlzoo.compose(aggregator=mtlzoo.create("upgrad", num_tasks=2))
    with pytest.raises(mtlzoo.errors.CheckpointMismatchError, match="reg_eps"):
        other.load_state_dict(saved)


def test_clip_norm_scales_the_update_to_the_largest_norm() -> None:
    """Reference: the definition, ||J^T c|| <= m with the direction of the wrapped aggregator's update."""
    grads = torch.tensor([[3.0, 0.0, 1.0], [0.0, 4.0, -1.0]], dtype=torch.float64)
    inner = mtlzoo.create("upgrad", num_tasks=2)
    plain = inner.aggregate(grads, torch.ones(2))
    clipped = ClipNorm(mtlzoo.create("upgrad", num_tasks=2), max_norm=0.5).aggregate(grads, torch.ones(2))
    torch.testing.assert_close(clipped, plain * 0.5 / plain.norm())
    loose = ClipNorm(mtlzoo.create("upgrad", num_tasks=2), max_norm=100.0).aggregate(grads, torch.ones(2))
    torch.testing.assert_close(loose, plain)


def test_every_n_steps_reuses_the_weights_between_recomputations() -> None:
    """Reference: the recurrence by hand: weights of steps 0 and 2 are MGDA's there, steps 1 and 3 reuse them."""
    every = EveryNSteps(mtlzoo.create("mgda", num_tasks=2), n=2)
    mgda = mtlzoo.create("mgda", num_tasks=2)
    matrices = [torch.randn(2, 5, dtype=torch.float64) for _ in range(4)]
    expected_weights = None
    for step, grads in enumerate(matrices):
        gramian = grads @ grads.T
        if step % 2 == 0:
            expected_weights = mgda.gramian_weights(gramian, torch.ones(2))
        torch.testing.assert_close(every.aggregate(grads, torch.ones(2)), expected_weights @ grads)
        every.advance()
    assert every.state.steps == 4


def test_a_modifier_refuses_an_aggregator_without_weights() -> None:
    with pytest.raises(InvalidStrategyError, match="GradDrop is not one"):
        ClipNorm(mtlzoo.create("graddrop", num_tasks=2))


def test_a_modifier_by_name_wraps_the_named_strategy_and_splits_the_options() -> None:
    strategy = mtlzoo.create("clip_norm(every(mgda))", num_tasks=2, n=3, max_norm=0.5, normalization="l2")
    assert isinstance(strategy, ClipNorm) and strategy.max_norm == 0.5
    assert isinstance(strategy.inner, EveryNSteps) and strategy.inner.n == 3
    assert strategy.inner.inner.normalization == "l2"
    grads = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    expected = ClipNorm(EveryNSteps(mtlzoo.create("mgda", num_tasks=2, normalization="l2"), 3), 0.5)
    torch.testing.assert_close(strategy.aggregate(grads, torch.ones(2)), expected.aggregate(grads, torch.ones(2)))
    mtl = mtlzoo.MTLWrapper(small_model(), "every(upgrad)", n=2)
    assert isinstance(mtl.strategy, EveryNSteps) and mtl.strategy.n == 2


def test_an_unknown_modifier_or_option_is_a_clear_error() -> None:
    with pytest.raises(mtlzoo.errors.UnknownStrategyError, match="Did you mean 'every'"):
        mtlzoo.create("evry(mgda)", num_tasks=2)
    with pytest.raises(mtlzoo.errors.UnknownHyperparameterError, match="'mgda' has no hyperparameter 'm'"):
        mtlzoo.create("every(mgda)", num_tasks=2, m=3)
    with pytest.raises(mtlzoo.errors.UnknownStrategyError, match="mgdaa"):
        mtlzoo.create("every(mgdaa)", num_tasks=2)
