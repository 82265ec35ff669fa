"""The EMA modifier (issue 21): CR-MOGM's smoothing of an aggregator's weights across optimizer steps.

Reference: the recurrence of Zhou et al. (NeurIPS 2022), c_t = beta c_{t-1} + (1 - beta) c^_t with c_1 = c^_1
(torchjd's ``CRMOGMWeighting`` default), computed by hand from the wrapped aggregator's own weights.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import mtlzoo
from mtlzoo.errors import InvalidStrategyError, SolverWarning
from mtlzoo.roles import EMA, GramianAggregator, HostStep
from mtlzoo.roles.modifiers import MODIFIERS
from tests.helpers import assert_same_state, batch, mse_losses, optimizer_for, small_model

INNERS = ["mgda", "upgrad", "nash_mtl"]


def jacobians(steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    for _ in range(steps):
        yield base + torch.randn(3, 20, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("inner", INNERS)
def test_beta_zero_is_the_wrapped_aggregator(inner: str) -> None:
    """beta = 0: the same updates as the plain method, bit for bit, over five steps (Nash-MTL's warm start carried)."""
    smoothed = mtlzoo.create(f"ema({inner})", num_tasks=3, beta=0.0)
    plain = mtlzoo.create(inner, num_tasks=3)
    ones = torch.ones(3, dtype=torch.float64)
    for matrix in jacobians(5):
        assert torch.equal(smoothed.aggregate(matrix, ones), plain.aggregate(matrix, ones))
        smoothed.advance()
        plain.advance()


@pytest.mark.parametrize("inner", INNERS)
def test_the_weights_follow_the_smoothing_recurrence(inner: str) -> None:
    """beta = 0.7: after each step the update is J^T c_t with c_t from the recurrence over the plain method's weights
    (a plain instance run alongside, advanced alike: the wrapped one's state evolves as it would alone), to 1e-12."""
    beta = 0.7
    smoothed = mtlzoo.create(f"ema({inner})", num_tasks=3, beta=beta)
    plain = mtlzoo.create(inner, num_tasks=3)
    ones = torch.ones(3, dtype=torch.float64)
    expected = None
    for matrix in jacobians(5, seed=1):
        fresh = plain.gramian_weights(matrix @ matrix.T, ones)
        plain.advance()
        expected = fresh if expected is None else beta * expected + (1 - beta) * fresh
        torch.testing.assert_close(smoothed.aggregate(matrix, ones), expected @ matrix, rtol=1e-12, atol=1e-12)
        smoothed.advance()
        torch.testing.assert_close(smoothed.weights, expected, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(expected, fresh)  # the smoothing did something


def spy(strategy: mtlzoo.Strategy, inner: GramianAggregator) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Record the wrapped aggregator's weights and the modifier's, step by step, inside MTLWrapper's backward."""
    fresh: list[np.ndarray] = []
    smoothed: list[torch.Tensor] = []
    weigh, compute = inner.weigh, strategy.compute

    def inner_weigh(gramian: np.ndarray, step: HostStep) -> np.ndarray:
        fresh.append(weigh(gramian, step))
        return fresh[-1]

    def outer_compute(inputs: mtlzoo.StepInputs) -> mtlzoo.Update:
        update = compute(inputs)
        smoothed.append(update.weights.detach().double().clone())
        return update

    inner.weigh = inner_weigh  # type: ignore[method-assign]
    strategy.compute = outer_compute  # type: ignore[method-assign]
    return fresh, smoothed


@pytest.mark.parametrize("target", ["parameters", "representation"])
@pytest.mark.parametrize("inner", INNERS)
def test_composes_by_name_and_trains_through_the_wrapper(inner: str, target: str) -> None:
    """"ema(name)" with beta and the wrapped method's own options: 25 Adam steps lower every task's loss, and at every
    step the weights applied are the recurrence over the weights the wrapped method gave (read inside the engine)."""
    torch.manual_seed(0)
    options = {"weighted_heads": False} if inner != "upgrad" else {}
    mtl = mtlzoo.MTLWrapper(small_model(), f"ema({inner})", beta=0.8, target=target, **options)
    assert isinstance(mtl.strategy, EMA) and mtl.strategy.request.where == target
    fresh, smoothed = spy(mtl.strategy, mtl.strategy.inner)
    optimizer = optimizer_for(mtl)
    evaluate = [batch(3, size=32, seed=seed) for seed in range(5)]

    def losses() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([torch.stack(mse_losses(mtl(x), y)) for x, y in evaluate]).mean(0)

    before = losses()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # Nash-MTL near stationary points, as documented
        for step in range(25):
            x, targets = evaluate[step % 5]
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
    assert bool((losses() < before).all())
    expected = torch.from_numpy(fresh[0])
    for step in range(25):
        expected = torch.from_numpy(fresh[step]) if step == 0 else 0.8 * expected + 0.2 * torch.from_numpy(fresh[step])
        torch.testing.assert_close(smoothed[step], expected, rtol=1e-6, atol=1e-9)


def test_composes_with_a_plugins_aggregator() -> None:
    """A third party's Gramian aggregator, registered like a plugin's: "ema(its name)" smooths its weights (the
    recurrence over its own weights, by hand) and trains."""

    class InverseNorm(mtlzoo.GramianAggregator):
        """Each gradient weighted by the inverse of its norm (a test plugin)."""

        info = mtlzoo.StrategyInfo(name="test_inverse_norm", summary="Weights 1 / ||g_k|| (test plugin).",
                                   request=mtlzoo.Request("parameters", "gramian"))

        def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
            return 1 / np.sqrt(np.diag(gramian))

    mtlzoo.register_strategy(InverseNorm)
    try:
        smoothed = mtlzoo.create("ema(test_inverse_norm)", num_tasks=3, beta=0.5)
        ones = torch.ones(3, dtype=torch.float64)
        expected = None
        for matrix in jacobians(4, seed=2):
            fresh = 1 / matrix.norm(dim=1)
            expected = fresh if expected is None else 0.5 * expected + 0.5 * fresh
            torch.testing.assert_close(smoothed.aggregate(matrix, ones), expected @ matrix)
            smoothed.advance()
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(small_model(), "ema(test_inverse_norm)", beta=0.5)
        optimizer = optimizer_for(mtl)
        x, targets = batch(3, size=32)
        before = torch.stack(mse_losses(mtl(x), targets)).detach()
        for _ in range(20):
            optimizer.zero_grad()
            mtl.backward(mse_losses(mtl(x), targets))
            mtl.step(optimizer)
        assert bool((torch.stack(mse_losses(mtl(x), targets)).detach() < before).all())
    finally:
        mtlzoo.registry.REGISTRY.unregister_plugin(mtlzoo.get_strategy("test_inverse_norm").origin.plugin)


def test_by_object_wrapping_a_modified_aggregator() -> None:
    """EMA(ClipNorm(MGDA)) by object, and ema(every(mgda)) by name: modifiers stack; an absent task keeps its
    smoothed weight."""
    strategy = EMA(mtlzoo.roles.ClipNorm(mtlzoo.create("mgda", num_tasks=3), max_norm=0.5), beta=0.5)
    assert "beta=0.5" in repr(strategy) and "max_norm=0.5" in repr(strategy)
    assert isinstance(mtlzoo.create("ema(every(mgda))", num_tasks=3, n=2, beta=0.3).inner, mtlzoo.roles.EveryNSteps)
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), strategy)
    x, targets = batch()
    mtl.backward(mse_losses(mtl(x), targets))
    mtl.step(torch.optim.SGD(mtl.parameters(), lr=0.1))
    kept = float(strategy.weights[1])
    losses: list = mse_losses(mtl(x), targets)
    losses[1] = None
    mtl.backward(losses)
    mtl.step(torch.optim.SGD(mtl.parameters(), lr=0.1))
    assert float(strategy.weights[1]) == kept and strategy.seen.tolist() == [True, True, True]


def train(mtl: mtlzoo.MTLWrapper, optimizer: torch.optim.Optimizer, steps: range, split: bool = True) -> None:
    for step in steps:
        x, targets = batch(3, size=32, seed=step)
        optimizer.zero_grad()
        for half in (slice(0, 16), slice(16, 32)) if split else (slice(0, 32),):
            mtl.backward(mse_losses(mtl(x[half]), targets[:, half]))
        mtl.step(optimizer)


@pytest.mark.parametrize("inner", INNERS)
def test_a_checkpoint_mid_run_resumes_bit_for_bit(inner: str) -> None:
    """Saved after 4 steps of two micro-batches (and once between the two micro-batches of a step), loaded into a
    fresh wrapper: the next 6 steps give the same model and the same smoothed weights, bit for bit."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), f"ema({inner})", beta=0.9)
    optimizer = optimizer_for(mtl)
    train(mtl, optimizer, range(4))
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    assert checkpoint["model"]["strategy.weights"].shape == (3,)
    train(mtl, optimizer, range(4, 10))

    torch.manual_seed(5)
    resumed = mtlzoo.MTLWrapper(small_model(), f"ema({inner})", beta=0.9)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, range(4, 10))
    assert_same_state(mtl.state_dict(), resumed.state_dict())


def test_a_checkpoint_between_micro_batches_resumes_the_step() -> None:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "ema(upgrad)", beta=0.6)
    optimizer = optimizer_for(mtl)
    train(mtl, optimizer, range(3))
    x, targets = batch(3, size=32, seed=3)
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x[:16]), targets[:, :16]))
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict(),
                                "grads": [p.grad for p in mtl.parameters()]})
    mtl.backward(mse_losses(mtl(x[16:]), targets[:, 16:]))
    mtl.step(optimizer)
    train(mtl, optimizer, range(4, 6))

    resumed = mtlzoo.MTLWrapper(small_model(), "ema(upgrad)", beta=0.6)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for param, grad in zip(resumed.parameters(), checkpoint["grads"]):
        param.grad = grad
    resumed.backward(mse_losses(resumed(x[16:]), targets[:, 16:]))
    resumed.step(resumed_optimizer)
    train(resumed, resumed_optimizer, range(4, 6))
    assert_same_state(mtl.state_dict(), resumed.state_dict())


def test_a_skipped_step_leaves_the_smoothed_weights() -> None:
    """A GradScaler step that overflows is skipped: the weights it staged are dropped; the next step smooths against
    the weights before it."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), "ema(mgda)", beta=0.5)
    optimizer = optimizer_for(mtl)
    train(mtl, optimizer, range(2), split=False)
    before = mtl.strategy.weights.clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-110, growth_interval=100)
    x, targets = batch(3, seed=50)
    optimizer.zero_grad()
    decay = 100 * sum(p.pow(2).sum() for p in mtl.backbone.parameters())
    mtl.backward(mse_losses(mtl(x), targets), backbone_loss=decay, scaler=scaler)
    assert not mtl.step(optimizer, scaler=scaler)
    assert torch.equal(mtl.strategy.weights, before)


@pytest.mark.parametrize(("name", "why"), [
    ("graddrop", "built from the gradients themselves"),
    ("ls", "is a loss weighting"),
    ("imtl", "composition of roles; smooth its aggregator part"),
    ("excess_mtl", "not read from the Gramian"),
    ("db_mtl", "composition of roles"),
    ("rotograd", "composition of roles"),
])
def test_refused_over_what_has_no_gramian_weights_saying_why(name: str, why: str) -> None:
    with pytest.raises(InvalidStrategyError, match=rf"ema smooths the weights c of an aggregator.*{why}"):
        mtlzoo.create(f"ema({name})", num_tasks=3, **({"rotation_shape": 4} if name == "rotograd" else {}))


def test_beta_is_checked_and_ema_is_a_listed_modifier() -> None:
    assert MODIFIERS["ema"] is EMA
    for beta in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"`beta` should be a number in \[0, 1\]"):
            mtlzoo.create("ema(mgda)", num_tasks=3, beta=beta)
    assert mtlzoo.create("ema(upgrad)", num_tasks=3, beta=0.5).properties == {"permutation_invariant", "scale_linear"}
    assert mtlzoo.create("ema(upgrad)", num_tasks=3, beta=0.0).properties == mtlzoo.create(
        "upgrad", num_tasks=3).properties
