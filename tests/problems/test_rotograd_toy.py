"""The RotoGrad paper's 2-D toy: summed losses let one task win, RotoGrad serves both.

Reference: the claim of Javaloy & Valera (ICLR 2022, Figure 1 and the authors' example/ folder),
checked as an outcome over seeds rather than as numbers copied from a run.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtlzoo.problems import RotoGradToy
from mtlzoo.problems.rotograd_toy import OPTIMUM_VALUE, SIGNS, toy_loss

SEEDS = range(5)


def test_each_task_has_its_optimum_where_the_paper_puts_it() -> None:
    for sign in SIGNS:
        at_optimum = torch.full((1, 2), -1.5 * sign)
        assert toy_loss(at_optimum, sign).item() == pytest.approx(OPTIMUM_VALUE)
        assert toy_loss(at_optimum + 0.1, sign) > toy_loss(at_optimum, sign)
        assert toy_loss(-at_optimum, sign) > 0  # the other task's optimum is far from this one's


@pytest.fixture(scope="module")
def results() -> dict[str, list[list[float]]]:
    toy = RotoGradToy()
    return {name: [toy.train(name, seed) for seed in SEEDS] for name in ("ls", "rotograd")}


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
    RotoGradToy(steps=2).train("rotograd", seed=3)
    assert torch.equal(state, torch.get_rng_state())
