"""What the ten loss weightings of issue 8 share: training the regression, listing, refusing bad input.

The worked examples, the torchjd 0.18 parity and each method's predicted direction are in
test_<method>.py; the registry-wide contract (bit-for-bit resume, accumulation, GradScaler) in
test_contract.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import mtlzoo
from mtlzoo.cli import main as cli_main
from mtlzoo.errors import NonPositiveLossError
from tests.helpers import assert_same_state, batch, mse_losses, optimizer_for, small_model, train_steps
from tests.strategies import _regression

ZOO: dict[str, dict[str, Any]] = {
    "ls": {}, "si": {}, "uw": {}, "dwa": {}, "rlw": {}, "gls": {}, "gradnorm": {"alpha": 1.5}, "imtl_l": {},
    "famo": {}, "stch": {"warmup_epochs": 1},
}
"""The ten methods of issue 8 and the hyperparameters their training test uses (STCH: a short warm-up, so that
its Tchebycheff phase trains too)."""
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_trains_the_regression_and_lowers_every_loss(name: str) -> None:
    """Through MTLWrapper, 40 epochs of the shared regression (loss scales 1, 1e2, 1e4) lower every task's loss."""
    run = _regression.trained(name, **ZOO[name])
    assert bool(torch.isfinite(run.after).all())
    assert bool((run.after < run.before).all()), f"{name}: {run.before.tolist()} -> {run.after.tolist()}"


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"ls"}))
def test_is_not_ls_in_disguise(name: str) -> None:
    """On the regression, the weights leave equal weights (each method's direction is tested in its own file)."""
    run = _regression.trained(name, **ZOO[name])
    weights = torch.stack(run.weights)
    normalised = weights / weights.sum(1, keepdim=True)
    assert float((normalised - 1 / _regression.NUM_TASKS).abs().max()) > 1e-3, name


def test_ls_is_the_baseline_the_others_are_told_apart_from() -> None:
    """The check above would fail for ls itself (so a method replaced by ls fails it)."""
    weights = torch.stack(_regression.trained("ls").weights)
    assert torch.equal(weights, torch.ones_like(weights))


def test_mtlzoo_list_shows_all_ten_with_their_papers() -> None:
    """`mtlzoo list` (the CLI) names each method with its paper's citation."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["list"]) == 0
    text = out.getvalue()
    for name in ZOO:
        entry = mtlzoo.get_strategy(name)
        row = next((line for line in text.splitlines() if re.match(rf"\s*{name}\s", line)), None)
        assert row is not None, f"{name} missing from `mtlzoo list`"
        if entry.info.paper is not None:
            assert entry.info.paper.citation() in row, row


def test_readme_strategy_table_lists_all_ten() -> None:
    """README.md's "## Strategies" table has a row for each."""
    section = README.read_text().split("## Strategies", 1)[1].split("\n## ", 1)[0]
    for name in ZOO:
        assert f"| `{name}` |" in section, name


@pytest.mark.parametrize(("name", "kwargs", "parameter"), [
    ("dwa", {"temperature": 0}, "temperature"),
    ("dwa", {"temperature": -1.0}, "temperature"),
    ("gradnorm", {"alpha": -0.5}, "alpha"),
    ("stch", {"mu": 0}, "mu"),
    ("stch", {"mu": -0.1}, "mu"),
    ("stch", {"warmup_epochs": -1}, "warmup_epochs"),
    ("famo", {"gamma": -1e-3}, "gamma"),
    ("famo", {"lr": -0.1}, "lr"),
    ("famo", {"min_losses": [0.0, 1.0]}, "min_losses"),
    ("rlw", {"seed": -3}, "seed"),
])
def test_out_of_range_hyperparameters_are_refused_by_name(name: str, kwargs: dict[str, Any], parameter: str) -> None:
    """The papers' domains (T > 0, alpha >= 0, mu > 0, gamma >= 0, ...) are checked at construction, by name."""
    arguments = {**ZOO[name], **kwargs}
    with pytest.raises(ValueError, match=f"`{parameter}"):
        mtlzoo.create(name, num_tasks=3, **arguments)


LOG_TAKERS = ["si", "gls", "famo", "stch", "dwa"]


def _trained(name: str) -> tuple[mtlzoo.MTLWrapper, torch.optim.Optimizer]:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model(), name, **ZOO[name])
    optimizer = optimizer_for(mtl)
    train_steps(mtl, optimizer, steps=3, epoch_every=1)
    return mtl, optimizer


@pytest.mark.parametrize("bad", [0.0, -1.0])
@pytest.mark.parametrize("name", LOG_TAKERS)
def test_a_zero_or_negative_loss_raises_naming_method_and_task(name: str, bad: float) -> None:
    """Instead of NaN or inf: a clear error naming the method and the task, nothing back-propagated, state unchanged.

    DWA takes no log per step; its epoch average is what it divides, so there the error comes at end_epoch().
    """
    mtl, optimizer = _trained(name)
    state = copy.deepcopy(mtl.state_dict())
    x, targets = batch(3, seed=9)
    optimizer.zero_grad()
    losses = mse_losses(mtl(x), targets)
    losses[2] = losses[2] * 0 + bad
    if name == "dwa":
        for _ in range(2):
            optimizer.zero_grad()
            losses = mse_losses(mtl(x), targets)
            mtl.backward([losses[0], losses[1], losses[2] * 0 + bad])
            mtl.step(optimizer)
        state = copy.deepcopy(mtl.state_dict())
        with pytest.raises(NonPositiveLossError, match=r"(?s)\(dwa\).*task 2"):
            mtl.end_epoch()
        assert_same_state(state, mtl.state_dict())
        return
    with pytest.raises(NonPositiveLossError, match=rf"(?s)\({name}\).*task 2"):
        mtl.backward(losses)
    assert all(p.grad is None for p in mtl.model_parameters())
    assert_same_state(state, mtl.state_dict())


def test_famo_refuses_a_zero_loss_after_the_step_and_keeps_its_logits() -> None:
    """FAMO takes the log of the post-step losses too: a zero there raises, naming the task, before the logits move."""
    mtl, optimizer = _trained("famo")
    x, targets = batch(3, seed=9)
    optimizer.zero_grad()
    mtl.backward(mse_losses(mtl(x), targets))
    logits = mtl.strategy.logits.clone()
    with pytest.raises(NonPositiveLossError, match=r"(?s)\(famo\).*task 0"):
        mtl.step(optimizer, post_step_losses=lambda: [torch.tensor(0.0), *mse_losses(mtl(x), targets)[1:]])
    assert torch.equal(mtl.strategy.logits, logits)


def test_ls_weights_loaded_from_a_checkpoint_take_effect() -> None:
    """`ls` skips the product with all-one weights; weights written by load_state_dict must still count.
    Reference: plain autograd of 1 * L_0 + 3 * L_1 + 1 * L_2 (a flag computed once at construction fails)."""
    torch.manual_seed(0)
    model = small_model()
    x, targets = batch()
    mtl = mtlzoo.MTLWrapper(copy.deepcopy(model), "ls")
    state = mtl.strategy.state_dict()
    state["task_weights"] = torch.tensor([1.0, 3.0, 1.0])
    mtl.strategy.load_state_dict(state)
    mtl.backward(mse_losses(mtl(x), targets))
    expected = torch.autograd.grad((torch.tensor([1.0, 3.0, 1.0]) * torch.stack(mse_losses(model(x), targets))).sum(),
                                   list(model.parameters()))
    for param, grad in zip(mtl.model_parameters(), expected):
        torch.testing.assert_close(param.grad, grad)
