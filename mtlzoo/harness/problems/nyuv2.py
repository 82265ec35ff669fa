"""``nyuv2`` (segmentation, depth and normals on NYUv2) and the base it shares with ``cityscapes``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from mtlzoo.harness.problems import dense
from mtlzoo.harness.problems.base import Batch, Metric
from mtlzoo.harness.problems.local import LocalBenchmark, missing_file
from mtlzoo.sharing import HardSharing
from mtlzoo.wrapper import MTLWrapper

NASH_MTL = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022 (https://arxiv.org/abs/2202.01017)"


@dataclass(frozen=True)
class SceneBenchmark(LocalBenchmark):
    """Base of ``nyuv2`` and ``cityscapes``: MTAN's per-sample arrays, the SegNet, Nash-MTL's recipe.

    Args:
        data: The folder holding ``train/`` and ``val/`` (MTAN's release; ``val`` is the test set).
        scale: ``"full"`` or ``"smoke"`` (see :class:`~mtlzoo.harness.problems.local.LocalBenchmark`).
        workers: Loader worker processes.
        batch_size: Training batch size (the test set is read in batches of ``eval_batch_size``: the
            metrics are over all its pixels, whatever the batch).
        epochs: Training epochs.
        lr: Adam's learning rate.
        lr_schedule: ``"step(100, 0.5)"``: halved after 100 epochs; ``"none"``; or ``"plateau(F, P, M)"``.
        augment: The random scale-crop and horizontal flip of Nash-MTL's and FAMO's loaders.
        average_last: Epochs at the end whose test metrics are averaged.
        eval_batch_size: Test batch size.
    """

    batch_size: int = 2
    epochs: int = 200
    lr: float = 1e-4
    lr_schedule: str = "step(100, 0.5)"
    augment: bool = True
    average_last: int = 10  # type: ignore[misc]
    eval_batch_size: int = 8

    classes: ClassVar[int]
    label_folder: ClassVar[str]
    normals: ClassVar[bool]
    source: ClassVar[str] = NASH_MTL

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", self.label_folder, "depth", *(("normal",) if self.normals else ()))

    @property
    def task_names(self) -> list[str]:
        return ["segmentation", "depth", *(["normal"] if self.normals else [])]

    @property
    def task_metrics(self) -> dict[str, tuple[str, ...]]:
        groups = {"segmentation": dense.SEGMENTATION, "depth": dense.DEPTH, "normal": dense.NORMAL}
        return {task: tuple(m.name for m in groups[task]) for task in self.task_names}

    @property
    def delta_m_terms(self) -> list[tuple[str, str]]:
        """Every metric of every task, as Nash-MTL's ``delta_fn`` averages them."""
        return [(task, name) for task, names in self.task_metrics.items() for name in names]

    @cached_property
    def sizes(self) -> dict[str, int]:
        return {split: dense.count_samples(self.root / split / "image") for split in ("train", "val")}

    @property
    def train_size(self) -> int:
        return self.sizes["train"]

    def check_data(self) -> None:
        for split in ("train", "val"):
            size = self.sizes[split]
            missing = [f"{split}/image/0.npy"] if size == 0 else \
                dense.first_missing(self.root, split, self.modalities, size)
            if missing:
                raise missing_file(self.root, missing, self.layout, self.name)
            dense.check_shapes(self.root, split, self.modalities, (3, None, 1, 3)[:len(self.modalities)], self.name)

    def build_model(self) -> HardSharing:
        return dense.segnet(self.classes, self.normals)

    def fetch(self, split: str, indices: list[int], seed: int | None) -> Any:
        image, labels, *rest = dense.stack_batch(self.root / split, self.modalities, indices)
        depth, normal = rest[0], (rest[1] if self.normals else None)
        if seed is not None:
            image, labels, depth, normal = dense.scale_crop_flip(image, labels, depth, normal,
                                                                 torch.Generator().manual_seed(seed))
        return image, (labels, depth, *(() if normal is None else (normal,)))

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        yield from self.loader("train", self.batch_size, self.train_size, generator, augment=self.augment)

    def losses(self, predictions: Any, targets: Any) -> list[torch.Tensor]:
        functions = (dense.segmentation_loss, dense.depth_loss, dense.normal_loss)
        return [loss(p, t) for loss, p, t in zip(functions, predictions, targets)]

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        metrics = dense.DenseMetrics(self.classes)
        for image, targets in self.loader("val", self.eval_batch_size, self.limit(self.sizes["val"])):
            predictions = mtl(image.to(device, non_blocking=True))
            labels, depth, *normal = (t.to(device, non_blocking=True) for t in targets)
            metrics.update_segmentation(predictions[0], labels)
            metrics.update_depth(predictions[1], depth)
            if self.normals:
                metrics.update_normal(predictions[2], normal[0])
        return {"segmentation": metrics.segmentation(), "depth": metrics.depth_errors(),
                **({"normal": metrics.normal_errors()} if self.normals else {})}


LAYOUT = """  train/image/<i>.npy    (288, 384, 3) float, RGB in [0, 1]     i = 0 .. 794
  train/label/<i>.npy    (288, 384) the class 0..12, -1 unlabelled
  train/depth/<i>.npy    (288, 384, 1) depth, 0 where unknown
  train/normal/<i>.npy   (288, 384, 3) unit normals, 0 where unknown
  val/...                the same for the 654 test images
(MTAN's preprocessed NYUv2, as Nash-MTL's and FAMO's code read it; see the comparison guide's NYUv2 page.)"""


@dataclass(frozen=True)
class NYUv2(SceneBenchmark):
    """NYUv2 (Silberman et al., ECCV 2012) as MTAN preprocessed it: 795 training and 654 test indoor
    images at 288 x 384, with 13-class segmentation, depth and surface normals.

    Source: the recipe of Nash-MTL's code (Navon et al., ICML 2022), as FAMO's (Liu et al., NeurIPS
    2023) repeats it: hard-sharing SegNet, Adam 1e-4 halved at epoch 100, 200 epochs of batches of
    2, scale-crop and flip augmentation, the last 10 epochs' test metrics averaged. Their tables use
    the MTAN network (task attention over the same SegNet); this problem trains the hard-sharing
    SegNet that their code ships beside it (``--model segnet``), so published numbers are for
    orientation, not for a match to the decimal.

    Metrics: ``segmentation`` mIoU and pixel accuracy (higher is better); ``depth`` absolute and
    relative error; ``normal`` mean and median angle error (lower is better) and the shares within
    11.25, 22.5 and 30 degrees (higher is better). Δm% averages all nine, as the papers do.
    """

    name: ClassVar[str] = "nyuv2"
    summary: ClassVar[str] = "NYUv2: 13-class segmentation, depth, normals (MTAN's arrays; SegNet, Nash-MTL's recipe)"
    literature: ClassVar[str] = ("Nash-MTL and FAMO report Δm% against single-task networks over the nine "
                                 "metrics, with the MTAN network: equal weighting worse than single-task training, "
                                 "Nash-MTL and FAMO better (the comparison guide's NYUv2 page)")
    metrics: ClassVar[tuple[Metric, ...]] = (*dense.SEGMENTATION, *dense.DEPTH, *dense.NORMAL)
    classes: ClassVar[int] = 13
    label_folder: ClassVar[str] = "label"
    normals: ClassVar[bool] = True
    layout: ClassVar[str] = LAYOUT
    default_steps: ClassVar[int] = 200 * 398
    """200 epochs of the 795 training images in batches of 2 (398 steps, the last batch of 1)."""
    full_steps: ClassVar[int] = 200 * 398
