"""The MultiMNIST-style problem on scikit-learn's 8x8 digits (``multidigits``).

Reference: the MultiMNIST construction (Sabour et al., NeurIPS 2017; Sener & Koltun, NeurIPS 2018):
two digits, the right one shifted so that they overlap, overlapping pixels the maximum of the two,
one classification task per digit; test pairs from held-out images. Checked against scikit-learn's
own images by hand-built canvases.
"""

from __future__ import annotations

import pytest
import torch

from mtlzoo.harness import train_and_evaluate
from mtlzoo.harness.problems import MultiDigits, create_problem, get_problem

sklearn_datasets = pytest.importorskip("sklearn.datasets")

SMALL = {"train_size": 1_000, "test_size": 500}


def test_canvas_is_the_two_digits_overlapping_by_their_maximum() -> None:
    problem = MultiDigits(**SMALL, shift=4)
    digits = sklearn_datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16
    x, y = problem.data["x_train"], problem.data["y_train"]
    assert x.shape == (1_000, 1, 8, 12) and y.shape == (2, 1_000)
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    for i in range(5):
        # find the two source images whose labels match and whose pixels rebuild the canvas
        canvas = x[i, 0]
        lefts = [j for j in range(len(images)) if digits.target[j] == y[0, i] and torch.equal(images[j][:, :4],
                                                                                              canvas[:, :4])]
        rights = [j for j in range(len(images)) if digits.target[j] == y[1, i] and torch.equal(images[j][:, 4:],
                                                                                               canvas[:, 8:])]
        assert any(torch.equal(torch.maximum(images[a][:, 4:], images[b][:, :4]), canvas[:, 4:8])
                   for a in lefts for b in rights)


def test_test_pairs_use_held_out_images() -> None:
    problem = MultiDigits(**SMALL, shift=8)  # side by side: each half is one image
    train = {tuple(half.flatten().tolist()) for x in problem.data["x_train"] for half in (x[0, :, :8], x[0, :, 8:])}
    test = {tuple(half.flatten().tolist()) for x in problem.data["x_test"] for half in (x[0, :, :8], x[0, :, 8:])}
    assert not train & test


def test_it_is_learnable_and_reports_accuracy_per_digit() -> None:
    problem = create_problem("multidigits", **SMALL)
    accuracies = train_and_evaluate(problem, "ls", seed=0, steps=150)
    assert problem.task_names == ["left", "right"]
    assert all(accuracy > 0.5 for accuracy in accuracies)  # chance is 0.1


def test_without_scikit_learn_it_is_listed_but_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mtlzoo.harness import default_problems

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert not get_problem("multidigits").available()
    assert "multidigits" not in default_problems()
    with pytest.raises(ImportError, match=r"mtlzoo\[digits\]"):
        create_problem("multidigits")
