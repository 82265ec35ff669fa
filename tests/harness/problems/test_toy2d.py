"""The RotoGrad paper's 2-D toy (``toy2d``): summed losses let one task win, RotoGrad serves both.

Reference: the claim of Javaloy & Valera (ICLR 2022, Figure 1 and the authors' example/ folder,
whose toy.yml gives the recipe: SGD 1e-3 for the model, Adam 0.05 for the rotations, normalised
losses, 400 steps), checked as an outcome over seeds rather than as numbers copied from a run.
"""

from __future__ import annotations

import math

import pytest
import torch

import mtlzoo
from mtlzoo.harness import train_and_evaluate
from mtlzoo.harness.problems import RotoGradToy, Toy2D, create_problem
from mtlzoo.harness.problems.toy2d import OPTIMA, OPTIMUM_VALUE, SIGNS, toy_loss

SEEDS = range(5)


def test_each_task_has_its_optimum_where_the_paper_puts_it() -> None:
    for sign, optimum in zip(SIGNS, OPTIMA):
        at_optimum = torch.tensor([optimum])
        assert toy_loss(at_optimum, sign).item() == pytest.approx(OPTIMUM_VALUE)
        assert toy_loss(at_optimum + 0.1, sign) > toy_loss(at_optimum, sign)
        assert toy_loss(-at_optimum, sign) > 0  # the other task's optimum is far from this one's


def test_the_recipe_is_the_authors_toy_yml() -> None:
    """toy.yml: SGD at 1e-3 for the model; Adam at 0.05 for the rotations; normalize: true; 400 epochs of one batch."""
    toy = create_problem("toy2d")
    assert (toy.model_optimizer, toy.model_lr, toy.default_steps, toy.batch_size) == ("sgd", 1e-3, 400, 256)
    rotograd, ls = mtlzoo.get_strategy("rotograd"), mtlzoo.get_strategy("ls")
    assert toy.strategy_optimizer(rotograd) == ("adam", 0.05)
    assert toy.strategy_optimizer(ls) is None
    assert toy.strategy_options(rotograd) == {"normalize_losses": True}
    assert toy.strategy_options(ls) == {}
    assert toy.strategy_options(mtlzoo.get_strategy("rotograd_norm"))["alpha"] == 1.5
    assert not toy.delta_m  # a dominant task's distance is near zero: no ratios against it
    assert RotoGradToy is Toy2D


def test_an_epoch_is_a_fixed_number_of_steps_of_the_one_batch() -> None:
    toy = Toy2D(epoch_steps=7)
    batches = list(toy.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == toy.steps_per_epoch == 7
    assert all(torch.equal(x, torch.zeros(256, 2)) and y is None for x, y in batches)


@pytest.fixture(scope="module")
def results() -> dict[str, list[list[float]]]:
    toy = Toy2D()
    return {name: [train_and_evaluate(toy, name, seed) for seed in SEEDS] for name in ("ls", "rotograd")}


def test_summed_losses_let_one_task_dominate(results: dict[str, list[list[float]]]) -> None:
    for losses in results["ls"]:
        assert min(losses) < OPTIMUM_VALUE + 1  # one task reaches its optimum ...
        assert max(losses) > 0  # ... and the other is left far from its own


def test_rotograd_brings_both_tasks_down(results: dict[str, list[list[float]]]) -> None:
    ls_worst = [max(losses) for losses in results["ls"]]
    rotograd_worst = [max(losses) for losses in results["rotograd"]]
    assert all(math.isfinite(loss) for losses in results["rotograd"] for loss in losses)
    for ours, baseline in zip(rotograd_worst, ls_worst):
        assert ours < baseline - 2  # on every seed the worst task is clearly better off ...
    assert sum(rotograd_worst) / len(SEEDS) < sum(ls_worst) / len(SEEDS) - 5  # ... and far better on average
    assert any(worst < OPTIMUM_VALUE + 0.5 for worst in rotograd_worst), "no seed put both tasks at their optimum"


def test_training_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    train_and_evaluate(Toy2D(), "rotograd", seed=3, steps=2)
    assert torch.equal(state, torch.get_rng_state())


def test_metrics_and_trace_are_the_tasks_outputs() -> None:
    """The distance metric is ||mean z_k - optimum_k|| and the trace follows z_k step by step (identity heads)."""
    from mtlzoo.harness import RunConfig, run

    result = run(Toy2D(), "ls", 0, RunConfig(steps=5, conflict_every=0))
    assert len(result.trace) == 5 and all(len(point) == 2 and len(point[0]) == 2 for point in result.trace)
    for k, (task, optimum) in enumerate(zip(["task0", "task1"], OPTIMA)):
        # the last trace point is before the last step; one more SGD step at 1e-3 moves it by very little
        last = torch.tensor(result.trace[-1][k])
        assert result.metrics[task]["distance"] == pytest.approx(float((last - torch.tensor(optimum)).norm()),
                                                                 abs=0.05)
        assert result.metrics[task]["loss"] == pytest.approx(float(toy_loss(last.view(1, 2), SIGNS[k])), abs=0.05)
