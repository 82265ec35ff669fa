"""Each benchmark metric against a value computed by hand on a tiny example; the batched transforms against the
per-sample operations the authors' loaders use (F.interpolate for MTAN's scale-crop; a loop for Nash-MTL's
``Complete`` and torch_geometric's ``Distance``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtlzoo.harness.problems import dense
from mtlzoo.harness.problems.celeba import f1_and_accuracy, f1_score
from tests.harness.benchmarks.datasets import write_qm9


def _log_probabilities(predicted: list[int], classes: int) -> torch.Tensor:
    """(1, C, 1, n) log-probabilities whose argmax is ``predicted``."""
    return torch.log_softmax(10 * F.one_hot(torch.tensor(predicted), classes).T.float(), 0)[None, :, None, :]


def test_miou_leaves_out_a_class_absent_from_truth_and_predictions_and_ignores_unlabelled_pixels() -> None:
    # labels 0 0 1 -1 1, predictions 0 1 1 2 1; class 2 is predicted only on the unlabelled pixel: no IoU.
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; mIoU (1/2 + 2/3) / 2; accuracy 3 / 4.
    metrics = dense.DenseMetrics(3)
    metrics.update_segmentation(_log_probabilities([0, 1, 1, 2, 1], 3), torch.tensor([[[0, 0, 1, -1, 1]]]))
    assert metrics.segmentation() == pytest.approx({"miou": (1 / 2 + 2 / 3) / 2, "pixel_acc": 3 / 4})


def test_miou_counts_a_class_predicted_but_absent_from_the_truth_as_zero() -> None:
    metrics = dense.DenseMetrics(3)  # class 2 predicted on a pixel labelled 1: IoU 0 for 2, 1/2 for 1, 1 for 0
    metrics.update_segmentation(_log_probabilities([0, 1, 2], 3), torch.tensor([[[0, 1, 1]]]))
    assert metrics.segmentation() == pytest.approx({"miou": (1 + 1 / 2 + 0) / 3, "pixel_acc": 2 / 3})


def test_metrics_accumulate_over_batches_as_over_one() -> None:
    one, two = dense.DenseMetrics(3), dense.DenseMetrics(3)
    one.update_segmentation(_log_probabilities([0, 1, 2, 2], 3), torch.tensor([[[0, 1, 1, 2]]]))
    two.update_segmentation(_log_probabilities([0, 1], 3), torch.tensor([[[0, 1]]]))
    two.update_segmentation(_log_probabilities([2, 2], 3), torch.tensor([[[1, 2]]]))
    assert one.segmentation() == two.segmentation()


def test_segmentation_loss_ignores_unlabelled_pixels() -> None:
    log_p = _log_probabilities([0, 1, 1], 2) * 0 + torch.log(torch.tensor([[[[0.5, 0.25, 0.9]], [[0.5, 0.75, 0.1]]]]))
    # labelled pixels: the first (class 0, p 0.5) and the third (class 1, p 0.1); the second is -1
    expected = -(math.log(0.5) + math.log(0.1)) / 2
    assert float(dense.segmentation_loss(log_p, torch.tensor([[[0, -1, 1]]]))) == pytest.approx(expected, rel=1e-6)


def test_depth_errors_skip_pixels_without_depth() -> None:
    truth = torch.tensor([2.0, 4.0, 0.0, 1.0]).view(1, 1, 1, 4)
    prediction = torch.tensor([3.0, 3.0, 7.0, 1.5]).view(1, 1, 1, 4)
    metrics = dense.DenseMetrics(2)
    metrics.update_depth(prediction, truth)
    # valid: errors 1, 1, 0.5 -> mean 2.5 / 3; relative 1/2, 1/4, 1/2 -> 1.25 / 3
    assert metrics.depth_errors() == pytest.approx({"abs_err": 2.5 / 3, "rel_err": 1.25 / 3})
    assert float(dense.depth_loss(prediction, truth)) == pytest.approx(2.5 / 3)


def test_angle_errors_of_known_normals() -> None:
    up = [0.0, 0.0, 1.0]
    angles = [0.0, 60.0, 90.0, 45.0, 10.0]
    predicted = [[math.sin(math.radians(a)), 0.0, math.cos(math.radians(a))] for a in angles] + [[1.0, 0.0, 0.0]]
    truth = [up] * 5 + [[0.0, 0.0, 0.0]]  # the last pixel has no normal
    to_map = lambda rows: torch.tensor(rows).T.reshape(1, 3, 1, 6)  # noqa: E731
    metrics = dense.DenseMetrics(2)
    metrics.update_normal(to_map(predicted), to_map(truth))
    result = metrics.normal_errors()
    assert result["mean_angle"] == pytest.approx(sum(angles) / 5, abs=1e-3)
    assert result["median_angle"] == pytest.approx(45.0, abs=1e-3)
    assert (result["within_11.25"], result["within_22.5"], result["within_30"]) == pytest.approx((0.4, 0.4, 0.4))
    # the loss: 1 - mean cosine over the five pixels with a normal
    cosines = [math.cos(math.radians(a)) for a in angles]
    assert float(dense.normal_loss(to_map(predicted), to_map(truth))) == pytest.approx(1 - sum(cosines) / 5, rel=1e-5)


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_angles() -> None:
    metrics = dense.DenseMetrics(2)
    metrics.angles = [torch.tensor([10.0, 40.0]), torch.tensor([20.0, 30.0])]
    assert metrics.normal_errors()["median_angle"] == pytest.approx(25.0)


def test_f1_and_accuracy_per_attribute() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.7, 0.1], [0.4, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    tp, fp, fn, right = f1_and_accuracy(probabilities, labels)
    # attribute 0: TP 1 (row 0), FP 1 (row 2), FN 1 (row 1) -> precision = recall = F1 = 1/2; right 2 of 4
    # attribute 1: nothing predicted, nothing true -> F1 0 (FAMO's 1e-8 guards), right 4 of 4
    assert f1_score(tp, fp, fn).tolist() == pytest.approx([0.5, 0.0], abs=1e-7)
    assert (right / 4).tolist() == [0.5, 1.0]


def test_scale_crop_matches_interpolate_on_each_sample() -> None:
    """The batched augmentation equals MTAN's per-sample F.interpolate of the drawn window (and the flip)."""
    generator = torch.Generator().manual_seed(3)
    image, normal = torch.rand(8, 3, 32, 64, generator=generator), torch.rand(8, 3, 32, 64, generator=generator)
    labels = torch.randint(-1, 5, (8, 32, 64), generator=generator)
    depth = torch.rand(8, 1, 32, 64, generator=generator)
    out = dense.scale_crop_flip(image, labels, depth, normal, torch.Generator().manual_seed(0))
    # replay the draws to know each sample's window
    draws = torch.Generator().manual_seed(0)
    scale = torch.tensor(dense.SCALES, dtype=torch.float64)[torch.randint(3, (8,), generator=draws)]
    h, w = (32 / scale).long(), (64 / scale).long()
    top = (torch.rand(8, generator=draws) * (32 - h + 1)).long()
    left = (torch.rand(8, generator=draws) * (64 - w + 1)).long()
    flip = torch.rand(8, generator=draws) < 0.5
    assert set(scale.tolist()) == set(dense.SCALES) and flip.any() and not flip.all()  # the draws exercise both paths
    for b in range(8):
        window = (slice(None), slice(int(top[b]), int(top[b] + h[b])), slice(int(left[b]), int(left[b] + w[b])))
        def crop(x: torch.Tensor, mode: str, b: int = b, window: tuple = window) -> torch.Tensor:
            corners = {"align_corners": True} if mode == "bilinear" else {}
            return F.interpolate(x[b][window][None], size=(32, 64), mode=mode, **corners)[0]

        expected = [crop(image, "bilinear"), crop(labels[:, None].float(), "nearest")[0].long(),
                    crop(depth, "nearest") / float(scale[b]), crop(normal, "bilinear")]
        if flip[b]:
            expected = [x.flip(-1) for x in expected]
            expected[3][0] = -expected[3][0]
        for got, want in zip(out, expected):
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_complete_graph_matches_the_per_molecule_transforms(tmp_path: Path) -> None:
    """Against Nash-MTL's ``Complete`` (every ordered pair, self-loops removed, bond attributes kept) written as a
    loop here, followed by torch_geometric's own ``Distance(norm=False)``."""
    import torch_geometric.transforms as T
    from torch_geometric.data import Batch, Data

    from mtlzoo.harness.problems.qm9 import complete_graph

    generator = torch.Generator().manual_seed(0)
    molecules = []
    for n in (3, 5, 4):
        chain = torch.arange(n - 1)
        edges = torch.cat([torch.stack([chain, chain + 1]), torch.stack([chain + 1, chain])], dim=1)
        attr = F.one_hot(torch.randint(0, 4, (n - 1,), generator=generator).repeat(2), 4).float()
        molecules.append(Data(x=torch.rand(n, 11), edge_index=edges, edge_attr=attr,
                              pos=torch.randn(n, 3, generator=generator)))
    expected = []
    for m in molecules:
        pairs = [(u, v) for u in range(m.num_nodes) for v in range(m.num_nodes) if u != v]
        attr = torch.zeros(len(pairs), 4)
        for e in range(m.edge_index.shape[1]):
            attr[pairs.index((int(m.edge_index[0, e]), int(m.edge_index[1, e])))] = m.edge_attr[e]
        full = Data(x=m.x, pos=m.pos, edge_index=torch.tensor(pairs).T, edge_attr=attr)
        expected.append(T.Distance(norm=False)(full))
    batch = Batch.from_data_list(molecules)
    edge_index, edge_attr = complete_graph(batch)
    reference = Batch.from_data_list(expected)
    assert torch.equal(edge_index, reference.edge_index)
    torch.testing.assert_close(edge_attr, reference.edge_attr)


def test_qm9_mae_is_in_the_targets_units_after_undoing_the_standardisation(tmp_path: Path) -> None:
    """A model predicting the standardised 0 (the training mean) has MAE mean |y - mean| per target, in meV for the
    energies (x 1000 of torch_geometric's eV), computed here from the raw targets of the test molecules."""
    from mtlzoo.harness.problems.qm9 import QM9, TARGETS, TASKS

    problem = QM9(data=str(write_qm9(tmp_path / "qm9")), workers=0, test_size=6, val_size=6, batch_size=4)

    class Zero(torch.nn.Module):
        def forward(self, graphs):
            return [torch.zeros(graphs.num_graphs, 1) for _ in TASKS]

    raw = torch.stack([problem.dataset[i].y[0] for i in range(len(problem.dataset))]).double()[:, list(TARGETS)]
    split = problem.split
    mean = raw[split["train"]].mean(0)
    expected = (raw[split["test"]] - mean).abs().mean(0)
    for k, task in enumerate(TASKS):
        if task in {"homo", "lumo", "zpve", "U0", "U", "H", "G"}:
            expected[k] *= 1000
    got = problem.mae(Zero(), torch.device("cpu"), "test")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
