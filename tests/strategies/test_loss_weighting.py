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
    ("ls", {"weights": "x"}, "weights"),  # issue 19, item 14: these three said "new(): invalid data type 'str'"
    ("famo", {"min_losses": "x"}, "min_losses"),
    ("gradnorm", {"layer": 3}, "layer"),  # and this one "'int' object is not iterable"
    ("gradnorm", {"layer": [""]}, "layer"),
])
def test_out_of_range_hyperparameters_are_refused_by_name(name: str, kwargs: dict[str, Any], parameter: str) -> None:
    """The papers' domains (T > 0, alpha >= 0, mu > 0, gamma >= 0, ...) are checked at construction, by name."""
    arguments = {**ZOO[name], **kwargs}
    with pytest.raises(ValueError, match=f"^Parameter `{parameter}` should .* Found `{parameter} = "):
        mtlzoo.create(name, num_tasks=3, **arguments)


LOG_TAKERS = ["si", "gls", "famo", "stch", "dwa"]


@pytest.mark.parametrize("name", ["dwa", "stch"])
def test_a_forgotten_end_epoch_is_said_after_a_plausible_epoch_length(name: str) -> None:
    """Issue 19, item 18: DWA behaved like ls (STCH stayed in its warm-up) for 10,000 steps before saying anything;
    they warn after 1000 steps (longer than an epoch of the standard benchmarks at their usual batch sizes), once."""
    strategy = mtlzoo.create(name, num_tasks=2)
    with pytest.warns(RuntimeWarning, match=r"1000 optimizer steps.*end_epoch\(\)") as caught:
        for _ in range(1001):
            strategy.weights(torch.tensor([1.0, 2.0]))
            strategy.advance()
    assert len(caught) == 1


def test_float64_losses_give_float64_weights_without_float32_rounding() -> None:
    """Issue 19, item 7, on the strategies' side: given float64 losses (StepInputs of a float64 model), SI's, FAMO's
    and GradNorm's weights and state are float64, equal to the formulas written out in float64; the losses here
    differ from 1 by less than float32's resolution. (DWA and STCH: test_dwa.py, test_stch.py.)"""
    from mtlzoo.protocol import StepInputs

    losses = torch.tensor([1.0 + 1e-9, 1.0 - 3e-9, 2.0 + 7e-9], dtype=torch.float64)
    inputs = StepInputs(losses, torch.arange(3), 3)
    si = mtlzoo.create("si", num_tasks=3)
    assert torch.equal(si.loss_weights(inputs), 1 / losses)

    gradnorm = mtlzoo.create("gradnorm", num_tasks=3, alpha=1.5)
    gradnorm.loss_weights(inputs)
    gradnorm.advance()
    assert torch.equal(gradnorm.initial_losses, losses)  # L(0): the ratios' reference, exactly

    famo = mtlzoo.create("famo", num_tasks=3)
    famo.loss_weights(inputs)
    famo.advance()
    after = losses - torch.tensor([2e-9, 1e-9, 4e-9], dtype=torch.float64)
    famo.post_step(after)
    assert famo.logits.dtype == torch.float64
    delta = (losses + 1e-8).log() - (after + 1e-8).log()  # in float32 all three would be 0
    z = torch.full((3,), 1 / 3, dtype=torch.float64)
    gradient = z * (delta - z @ delta)  # Adam's first step: lr g / (|g| + eps), gamma x 0 = 0
    # delta ~ 1e-9 from logs of ~1 known to ~1e-16: relative conditioning ~1e-7
    torch.testing.assert_close(famo.logits, -0.025 * gradient / (gradient.abs() + 1e-8), rtol=1e-5, atol=0)
    shifted = losses + 1e-8
    c = 1 / (torch.softmax(famo.logits, 0) / shifted).sum()
    torch.testing.assert_close(famo.weights(losses), c * torch.softmax(famo.logits, 0) / shifted, rtol=1e-12, atol=0)


def test_a_float64_model_gives_si_float64_weights_through_the_wrapper() -> None:
    """Issue 19, item 7, end to end: in a float64 model, SI's weights are 1 / L in float64."""
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(small_model().double(), "si")
    x, targets = batch(3)
    losses = mse_losses(mtl(x.double()), targets.double())
    mtl.backward(losses)
    assert torch.equal(mtl.last_step.loss_weights, 1 / torch.stack(losses).detach())


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

    DWA too (issue 19, item 13): it divides epoch averages, and used to refuse only at end_epoch(), saying "nothing
    was back-propagated and the state is unchanged" after the bad losses had trained the model and joined the sums;
    it now refuses the loss in the backward that sees it, before either happens.
    """
    mtl, optimizer = _trained(name)
    state = copy.deepcopy(mtl.state_dict())
    x, targets = batch(3, seed=9)
    optimizer.zero_grad()
    losses = mse_losses(mtl(x), targets)
    losses[2] = losses[2] * 0 + bad
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
