"""``cityscapes``: 7-class semantic segmentation and depth on Cityscapes, from MTAN's preprocessed arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtlzoo.harness.problems import dense
from mtlzoo.harness.problems.base import Metric
from mtlzoo.harness.problems.nyuv2 import SceneBenchmark

LAYOUT = """  train/image/<i>.npy     (128, 256, 3) float, RGB in [0, 1]     i = 0 .. 2974
  train/label_7/<i>.npy   (128, 256) the class 0..6, -1 unlabelled
  train/depth/<i>.npy     (128, 256, 1) inverse depth, 0 where unknown
  val/...                 the same for the 500 test images
(MTAN's preprocessed Cityscapes, as Nash-MTL's and FAMO's code read it; see the comparison guide's Cityscapes page.)"""


@dataclass(frozen=True)
class Cityscapes(SceneBenchmark):
    """Cityscapes (Cordts et al., CVPR 2016) as MTAN preprocessed it: 2,975 training and 500 test street
    scenes at 128 x 256, with 7-class segmentation and (inverse) depth.

    Source: FAMO's code (Liu et al., NeurIPS 2023), Nash-MTL's recipe (Navon et al., ICML 2022):
    hard-sharing SegNet, Adam 1e-4 halved at epoch 100, 200 epochs of batches of 8, scale-crop and
    flip augmentation, the last 10 epochs' test metrics averaged. Their tables use the MTAN network;
    this problem trains the hard-sharing SegNet their code ships beside it.

    Metrics: ``segmentation`` mIoU and pixel accuracy (higher is better); ``depth`` absolute and
    relative error (lower is better). Δm% averages all four, as the papers do.
    """

    batch_size: int = 8

    name: ClassVar[str] = "cityscapes"
    summary: ClassVar[str] = "Cityscapes: 7-class segmentation and depth (MTAN's arrays; SegNet, Nash-MTL's recipe)"
    source: ClassVar[str] = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023 " \
                            "(https://arxiv.org/abs/2306.03792), after Navon et al., ICML 2022"
    literature: ClassVar[str] = ("Nash-MTL and FAMO report Δm% against single-task networks over the four "
                                 "metrics, with the MTAN network (the comparison guide's Cityscapes page)")
    metrics: ClassVar[tuple[Metric, ...]] = (*dense.SEGMENTATION, *dense.DEPTH)
    classes: ClassVar[int] = 7
    label_folder: ClassVar[str] = "label_7"
    normals: ClassVar[bool] = False
    layout: ClassVar[str] = LAYOUT
    default_steps: ClassVar[int] = 200 * 372
    """200 epochs of the 2,975 training images in batches of 8 (372 steps, the last batch of 7)."""
    full_steps: ClassVar[int] = 200 * 372
