"""The contract every registered strategy meets, plugins included (parametrized over the registry).

A strategy whose request reads several independent batches per step (SDMGrad, MoDo) gets them at every backward
(``tests.helpers.more_batches``: each from a forward of its own, a task absent from the first absent from all)."""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import Request
from mtlzoo.strategy import KINDS
from tests.helpers import (
    assert_same_state,
    batch,
    more_batches,
    mse_losses,
    optimizer_for,
    required_kwargs,
    small_model,
    train_steps,
)

NAMES = [entry.name for entry in mtlzoo.list_strategies()]


def build(name: str, seed: int, **options: object) -> tuple[mtlzoo.MTLWrapper, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **required_kwargs(name), **options)
    with torch.no_grad():
        mtl(batch()[0])  # materialises lazily shaped strategies
    return mtl, optimizer_for(mtl)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_is_complete(name: str) -> None:
    entry = mtlzoo.get_strategy(name)
    info = entry.info
    assert re.fullmatch(r"[a-z][a-z0-9_]*", info.name) and info.kind in KINDS
    assert isinstance(info.request, Request)
    assert info.summary and entry.cls.__doc__
    if info.paper is not None:
        assert info.paper.url.startswith("https://")
        assert info.paper.title in entry.cls.__doc__ or info.paper.url in entry.cls.__doc__, "paper not in docstring"
    strategy = mtlzoo.create(name, num_tasks=3, **required_kwargs(name))
    assert isinstance(strategy.request, Request) and strategy.properties <= info.properties
    text = repr(strategy)
    assert "num_tasks=3" in text
    for hyperparameter in entry.hyperparameters:
        assert f"{hyperparameter}=" in text, f"repr of {name} misses {hyperparameter}"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_training(name: str) -> None:
    runs = []
    for _ in range(2):
        mtl, optimizer = build(name, seed=3)
        train_steps(mtl, optimizer, steps=3)
        runs.append(copy.deepcopy(mtl.state_dict()))
    assert_same_state(runs[0], runs[1])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_bit_for_bit(name: str) -> None:
    """A checkpoint mid-training resumes exactly, across the default burn-in of 20 steps, with a backbone_loss and
    epoch hooks (issue 7, item 24: the old test stopped at 7 steps, without either)."""
    options = {"backbone_loss": True, "epoch_every": 4}
    mtl, optimizer = build(name, seed=1)
    train_steps(mtl, optimizer, steps=6, **options)
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    train_steps(mtl, optimizer, steps=18, first_seed=100, **options)

    torch.manual_seed(7)  # a different initialisation, overwritten by the checkpoint
    resumed = mtlzoo.MTLWrapper(small_model(), name, **required_kwargs(name))
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, resumed_optimizer, steps=18, first_seed=100, **options)

    assert_same_state(mtl.state_dict(), resumed.state_dict())


def training_losses(mtl: mtlzoo.MTLWrapper, batches: int = 5) -> torch.Tensor:
    """Each task's loss on the training batches (the targets are noise: nothing to generalise to)."""
    with torch.no_grad():
        return torch.stack([torch.stack(mse_losses(mtl(x), targets))
                            for x, targets in (batch(len(mtl), size=32, seed=seed) for seed in range(batches))]).mean(0)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_trains_and_advances_once_per_step(name: str, use_cache: bool) -> None:
    """Two micro-batches per optimizer step: every loss goes down, the state advances once per step.

    With its heads unweighted: under MGDA's authors' choice (``weighted_heads=True``) head k learns from c_k L_k,
    and a task whose coefficient stays near 0 (MGDA favours the smallest gradient) leaves its head untrained, as
    theirs does (tests/strategies/test_weighted_heads.py)."""
    unweighted = {"weighted_heads": False} if "weighted_heads" in mtlzoo.get_strategy(name).hyperparameters else {}
    mtl, optimizer = build(name, seed=2, **unweighted)
    before = training_losses(mtl)
    for step in range(25):
        x, targets = batch(len(mtl), size=32, seed=step % 5)
        optimizer.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):
            with mtlzoo.cached() if use_cache else contextlib.nullcontext():
                losses = mse_losses(mtl(x[half]), targets[:, half])
                mtl.backward(losses, more_batches=more_batches(mtl, step))
        assert mtl.strategy.micro_batch == 2
        mtl.step(optimizer, post_step_losses=lambda x=x, targets=targets: mse_losses(mtl(x), targets))
        assert mtl.strategy.micro_batch == 0
        if hasattr(mtl.strategy, "step"):
            assert mtl.strategy.step == step + 1
    after = training_losses(mtl)
    assert bool((after < before).all()), f"{name}: {before.tolist()} -> {after.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_an_overflowing_scaled_step_changes_nothing_and_the_next_one_trains(name: str) -> None:
    """A GradScaler whose scale overflows the step: the whole state_dict (model, strategy) is unchanged."""
    mtl, optimizer = build(name, seed=4)
    train_steps(mtl, optimizer, steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-110, growth_interval=100)
    state = copy.deepcopy(mtl.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    x, targets = batch(len(mtl), seed=50)

    def after() -> list[torch.Tensor]:
        return mse_losses(mtl(x), targets)

    optimizer.zero_grad()
    decay = 100 * sum(p.pow(2).sum() for p in mtl.backbone.parameters())  # its gradient times 2^127 overflows
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses, backbone_loss=decay, scaler=scaler, more_batches=more_batches(mtl, 50))
    assert not mtl.step(optimizer, scaler=scaler, post_step_losses=after)
    assert_same_state(state, mtl.state_dict())
    assert str(optimizer_state) == str(optimizer.state_dict())
    optimizer.zero_grad()
    losses = mse_losses(mtl(x), targets)
    mtl.backward(losses, scaler=scaler, more_batches=more_batches(mtl, 50))
    assert mtl.step(optimizer, scaler=scaler, post_step_losses=after)
    changed = [key for key, value in mtl.state_dict().items()
               if isinstance(value, torch.Tensor) and not torch.equal(value, state[key])]
    assert any(key.startswith("backbone.") for key in changed)


@pytest.mark.parametrize("name", NAMES)
def test_absent_tasks_are_left_out_and_their_heads_untouched(name: str) -> None:
    mtl, optimizer = build(name, seed=5)
    for step in range(4):
        x, targets = batch(len(mtl), seed=step)
        optimizer.zero_grad()
        losses: list = mse_losses(mtl(x), targets)
        losses[step % 3] = None
        mtl.backward(losses, more_batches=more_batches(mtl, step, absent=step % 3))
        absent = list(mtl.heads[step % 3].parameters())
        assert all(p.grad is None for p in absent)
        assert all(torch.isfinite(p.grad).all() for p in mtl.backbone.parameters())
        mtl.step(optimizer, post_step_losses=lambda x=x, targets=targets, absent=step % 3: [
            None if k == absent else loss for k, loss in enumerate(mse_losses(mtl(x), targets))])


@pytest.mark.parametrize("name", NAMES)
def test_metadata_flags_hold(name: str) -> None:
    """Issue 7, item 24: `learnable`, `adapts_representation` and `stochastic` are checked, not only declared."""
    mtl, optimizer = build(name, seed=6)
    info = mtl.strategy.info
    assert info.learnable == any(p.requires_grad for p in mtl.strategy.parameters())
    z = torch.randn(8, 4)
    adapted = any(not torch.equal(mtl.strategy.adapt(z, k), z) for k in range(len(mtl)))
    assert info.adapts_representation == adapted
    if not info.stochastic:
        rng = torch.get_rng_state()
        train_steps(mtl, optimizer, steps=2)
        assert torch.equal(rng, torch.get_rng_state()), f"{name} draws from the global generator"


@pytest.mark.parametrize("name", NAMES)
def test_task_model_owns_its_part_and_round_trips(name: str) -> None:
    """Issue 6: mtl[k].state_dict() holds task k's rotation; a fresh task model loading it gives the same outputs."""
    mtl, optimizer = build(name, seed=7)
    train_steps(mtl, optimizer, steps=3)
    mtl.eval()
    x = batch(len(mtl))[0]
    task = mtl[1]
    state = copy.deepcopy(task.state_dict())
    torch.manual_seed(123)
    other = mtlzoo.MTLWrapper(small_model(), name, **required_kwargs(name))
    with torch.no_grad():
        other(x)
    fresh = other.eval()[1]
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), task(x))
        torch.testing.assert_close(task(x), mtl(x)[1])
