"""The contract every registered strategy meets, plugins included (parametrized over the registry)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import mtlzoo
from mtlzoo.protocol import Request
from mtlzoo.strategy import KINDS
from tests.helpers import assert_same_state, batch, optimizer_for, required_kwargs, small_model, train_steps

NAMES = [entry.name for entry in mtlzoo.list_strategies()]


def build(name: str, seed: int) -> tuple[mtlzoo.MTLWrapper, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **required_kwargs(name))
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
    mtl, optimizer = build(name, seed=1)
    train_steps(mtl, optimizer, steps=3)
    checkpoint = copy.deepcopy({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()})
    train_steps(mtl, optimizer, steps=4, first_seed=100)

    torch.manual_seed(7)  # a different initialisation, overwritten by the checkpoint
    resumed = mtlzoo.MTLWrapper(small_model(), name, **required_kwargs(name))
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_for(resumed)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train_steps(resumed, resumed_optimizer, steps=4, first_seed=100)

    assert_same_state(mtl.state_dict(), resumed.state_dict())
