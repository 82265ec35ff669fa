"""The mixed-scale problem on scikit-learn's 8x8 digits (``mixedscale``).

Reference: scikit-learn's own images and labels. The targets are rebuilt here from them by hand
(the class, whether it is 5 or more, the count of pixels above half intensity), and the problem's
point, losses on scales two orders of magnitude apart, is checked at the untrained model.
"""

from __future__ import annotations

import pytest
import torch

from mtlzoo import MTLWrapper
from mtlzoo.harness import train_and_evaluate
from mtlzoo.harness.problems import MixedScale, check_metrics, create_problem

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def test_targets_are_the_class_its_half_and_the_raw_ink_count() -> None:
    problem = MixedScale()
    digits = sklearn_datasets.load_digits()
    raw = torch.tensor(digits.images, dtype=torch.float32)
    data = problem.data
    for split in ("train", "test"):
        images = data[f"x_{split}"][:, 0] * 16
        index = [int(((raw - image).abs().sum((1, 2)) == 0).nonzero()[0]) for image in images[:20]]
        labels = torch.tensor(digits.target[index])
        assert torch.equal(data[f"digit_{split}"][:20], labels)
        assert torch.equal(data[f"large_{split}"][:20], (labels >= 5).long())
        assert torch.equal(data[f"ink_{split}"][:20], (raw[index] > 8).sum((1, 2)).float())
    assert len(data["x_train"]) + len(data["x_test"]) == len(raw)
    train = {tuple(x.flatten().tolist()) for x in data["x_train"]}
    repeated = sum(tuple(x.flatten().tolist()) in train for x in data["x_test"])  # identical images only
    assert repeated < 0.05 * len(data["x_test"])


def test_the_losses_start_two_orders_of_magnitude_apart() -> None:
    problem = MixedScale()
    torch.manual_seed(0)
    mtl = MTLWrapper(problem.build_model(), "ls")
    x, targets = next(problem.epoch(torch.Generator().manual_seed(0)))
    digit, large, ink = (float(loss.detach()) for loss in problem.losses(mtl(x), targets))
    assert ink > 100 * max(digit, large)


def test_each_task_reports_its_own_metric_with_its_direction() -> None:
    problem = create_problem("mixedscale")
    assert problem.task_metrics == {"digit": ("accuracy",), "large": ("accuracy",), "ink": ("rmse",)}
    directions = {metric.name: metric.higher_is_better for metric in problem.metrics}
    assert directions == {"accuracy": True, "rmse": False}
    reported = problem.evaluate(MTLWrapper(problem.build_model(), "ls").eval(), torch.device("cpu"))
    check_metrics(problem, reported)  # raises on a missing or unexpected metric
    assert reported["ink"]["rmse"] > 10  # untrained: about sqrt(350)


def test_a_scale_invariant_method_learns_every_task() -> None:
    digit, large, ink = train_and_evaluate(create_problem("mixedscale"), "famo", seed=0, steps=200)
    assert digit > 0.5 and large > 0.7  # chance: 0.1 and about 0.5
    assert ink < 5  # the targets' spread is about 2.7 pixels; an untrained model is off by about 19
