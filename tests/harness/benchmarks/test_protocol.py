"""The evaluation protocols of the benchmarks' papers, on a small built-in problem: the mean of the last epochs'
test metrics (MTAN, Nash-MTL, FAMO on NYUv2 and Cityscapes) and the test metrics of the best validation epoch
(Nash-MTL on QM9, FAMO on CelebA; ties go to the later epoch, as Nash-MTL's ``<=``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from mtlzoo.harness import RunConfig, run
from mtlzoo.harness.problems import GradNormSynthetic


@dataclass(frozen=True)
class Averaged(GradNormSynthetic):
    average_last: int = 2  # type: ignore[misc]
    name: ClassVar[str] = "averaged_for_tests"


SCORES = itertools.cycle([3.0, 1.0, 2.0, 1.0])


@dataclass(frozen=True)
class Selected(GradNormSynthetic):
    select_by_validation: bool = True  # type: ignore[misc]
    name: ClassVar[str] = "selected_for_tests"

    def validation_score(self, mtl, device) -> float:
        return next(SCORES)


SMALL = {"num_tasks": 2, "train_size": 40, "test_size": 20, "batch_size": 10}  # 4 steps an epoch


@pytest.mark.parametrize(("steps", "evaluated"), [(12, [8, 12]), (10, [8, 10]), (3, [3])])
def test_the_last_epochs_are_averaged(steps: int, evaluated: list[int]) -> None:
    result = run(Averaged(**SMALL), "ls", 0, RunConfig(steps=steps, conflict_every=0))
    assert result.ok, result.error
    assert [e["step"] for e in result.evaluations] == evaluated
    for task, values in result.metrics.items():
        for name, value in values.items():
            assert value == pytest.approx(math.fsum(e["metrics"][task][name] for e in result.evaluations)
                                          / len(evaluated))


def test_the_best_validation_epoch_is_reported() -> None:
    global SCORES
    SCORES = itertools.cycle([3.0, 1.0, 2.0, 1.0])
    result = run(Selected(**SMALL), "ls", 0, RunConfig(steps=16, conflict_every=0))
    assert result.ok, result.error
    # scores 3, 1, 2, 1 after epochs 1..4: the test set is evaluated at each new best (ties: the later)
    assert [(e["step"], e["validation"]) for e in result.evaluations] == [(4, 3.0), (8, 1.0), (16, 1.0)]
    assert result.metrics == result.evaluations[-1]["metrics"]
    assert result.evaluations[1]["metrics"] != result.evaluations[2]["metrics"]


def test_a_plateau_schedule_steps_on_the_validation_score() -> None:
    """The benchmarks' schedules from their text: StepLR for the scenes, ReduceLROnPlateau for QM9."""
    from mtlzoo.harness.problems.local import parse_schedule

    assert parse_schedule("step(100, 0.5)") == ("step", (100.0, 0.5))
    assert parse_schedule("plateau(0.7, 5, 1e-5)") == ("plateau", (0.7, 5.0, 1e-5))
    assert parse_schedule(None) == ("none", ())
    with pytest.raises(ValueError, match="step\\(EPOCHS, GAMMA\\)"):
        parse_schedule("cosine(3)")
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    from mtlzoo.harness.problems.qm9 import QM9

    settings = type("Settings", (), {"lr_schedule": "plateau(0.7, 5, 1e-5)"})()
    scheduler = QM9.lr_scheduler(settings, optimizer)  # type: ignore[arg-type]
    for _ in range(7):
        scheduler.step(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(7e-4)
