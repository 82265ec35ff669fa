"""``celeba``: the 40 binary face attributes of CelebA (K = 40), from the aligned images and the attribute list."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtlzoo.errors import DataError
from mtlzoo.harness.problems.base import Metric
from mtlzoo.harness.problems.local import LocalBenchmark, missing_file
from mtlzoo.sharing import HardSharing
from mtlzoo.wrapper import MTLWrapper

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
SIZE = 64
SPLITS = {"train": 0, "val": 1, "test": 2}
LAYOUTS = (  # (images, attributes, partition), relative to the folder
    ("Img/img_align_celeba", "Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"),
    ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"),
    ("celeba/img_align_celeba", "celeba/list_attr_celeba.txt", "celeba/list_eval_partition.txt"),
)
LAYOUT = """  Img/img_align_celeba/000001.jpg ... 202599.jpg   the aligned and cropped faces
  Anno/list_attr_celeba.txt                        the count, the 40 attribute names, then one line per image
  Eval/list_eval_partition.txt                     one line per image: its name and 0 (train), 1 (val), 2 (test)
(the official release's layout, as FAMO's code reads it; torchvision's, with the three in one folder
 `celeba/` or in the folder itself, is accepted too)"""


def f1_and_accuracy(probabilities: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per attribute (columns): true positives, false positives, false negatives and right answers at threshold 0.5."""
    predicted = probabilities.gt(0.5).double()
    labels = labels.double()
    return ((predicted * labels).sum(0), (predicted * (1 - labels)).sum(0), ((1 - predicted) * labels).sum(0),
            (predicted == labels).double().sum(0))


def f1_score(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """F1 from the counts, with FAMO's code's 1e-8 in each denominator."""
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    return 2 * precision * recall / (precision + recall + 1e-8)


def _stage(channels_in: int, channels_out: int, convs: int) -> list[nn.Module]:
    return [layer for i in range(convs) for layer in (
        nn.Conv2d(channels_in if i == 0 else channels_out, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))]


class _ToUnit(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.float() / 255


def famo_network() -> HardSharing:
    """FAMO's CelebA network: uint8 (B, 3, 64, 64) images -> a VGG-style trunk (four stages, 64 to 512 channels,
    batch norm, global average pooling, two 512-wide linear layers) -> 40 linear heads with a sigmoid."""
    backbone = nn.Sequential(
        _ToUnit(), *_stage(3, 64, 1), nn.MaxPool2d(2), *_stage(64, 128, 2), nn.MaxPool2d(2),
        *_stage(128, 256, 2), nn.MaxPool2d(2), *_stage(256, 512, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
        nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True))
    return HardSharing(backbone, [nn.Sequential(nn.Linear(512, 1), nn.Sigmoid()) for _ in ATTRIBUTES])


@dataclass(frozen=True)
class CelebA(LocalBenchmark):
    """CelebA (Liu et al., ICCV 2015): 202,599 aligned faces, 40 binary attributes, one task each.

    Source: FAMO's code (Liu et al., *FAMO: Fast Adaptive Multitask Optimization*, NeurIPS 2023):
    the standard split (162,770 / 19,867 / 19,962), 64 x 64 images, its convolutional network, binary
    cross-entropy on sigmoid outputs, Adam 3e-4, 15 epochs of 256, the test metrics of the epoch with
    the best mean validation F1.

    Metrics per attribute: ``f1`` (FAMO's metric and Δm%'s term) and ``accuracy`` (higher is better).

    Args:
        data: The folder holding the images and the two lists (see :data:`LAYOUT`).
        scale: ``"full"`` or ``"smoke"``.
        workers: Loader worker processes (each decodes and resizes its batch's JPEGs).
        batch_size, epochs, lr, lr_schedule: The recipe (FAMO's: 256, 15, 3e-4, none).
        select_by_validation: Report the test metrics of the epoch with the best mean validation F1.
        eval_batch_size: Batch size of the validation and test passes.
    """

    batch_size: int = 256
    epochs: int = 15
    lr: float = 3e-4
    lr_schedule: str = "none"
    select_by_validation: bool = True  # type: ignore[misc]
    eval_batch_size: int = 256

    name: ClassVar[str] = "celeba"
    summary: ClassVar[str] = "CelebA: 40 binary face attributes (aligned images; FAMO's network and recipe)"
    source: ClassVar[str] = "Liu et al., FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023 " \
                            "(https://arxiv.org/abs/2306.03792)"
    literature: ClassVar[str] = ("FAMO reports Δm% over the 40 attributes' F1 against single-task networks; its "
                                 "point is the cost at K = 40, where methods that need K gradients per step are "
                                 "slow (the comparison guide's CelebA page)")
    metrics: ClassVar[tuple[Metric, ...]] = (Metric("f1", True, "F1 score of the attribute (threshold 0.5)"),
                                             Metric("accuracy", True, "share of images with the attribute right"))
    layout: ClassVar[str] = LAYOUT
    requires: ClassVar[tuple[str, ...]] = ("PIL",)
    extra: ClassVar[str | None] = "images"
    default_steps: ClassVar[int] = 15 * 636
    """15 epochs of the 162,770 training images in batches of 256 (636 steps, the last of 210)."""
    full_steps: ClassVar[int] = 15 * 636

    @property
    def task_names(self) -> list[str]:
        return list(ATTRIBUTES)

    @cached_property
    def files(self) -> tuple[Path, Path, Path]:
        """The images folder, the attribute list and the partition list (the first layout whose lists exist)."""
        root = self.root
        for images, attributes, partition in LAYOUTS:
            if (root / attributes).is_file() and (root / partition).is_file():
                return root / images, root / attributes, root / partition
        raise missing_file(root, list(LAYOUTS[0][1:]), self.layout, self.name)

    @cached_property
    def table(self) -> dict[str, Any]:
        """``names`` (the image files), ``labels`` (n, 40) uint8 in {0, 1}, and per split its row indices."""
        _, attributes, partition = self.files
        lines = attributes.read_text().split("\n")
        header = tuple(lines[1].split()) if len(lines) > 1 else ()
        if header != ATTRIBUTES:
            raise DataError(f"Problem {self.name!r}: the second line of {attributes} should name the 40 attributes "
                            f"({', '.join(ATTRIBUTES[:3])}, ...). Found {' '.join(header[:4])!r}...")
        rows = [line.split() for line in lines[2:] if line.strip()]
        bad = next((row for row in rows if len(row) != 41), None)
        if bad is not None:
            raise DataError(f"Problem {self.name!r}: {attributes} has a line with {len(bad) - 1} values instead of "
                            f"40: {' '.join(bad)[:80]!r}.")
        names = [row[0] for row in rows]
        labels = np.array([row[1:] for row in rows], dtype=np.int8) > 0
        splits = dict(line.split() for line in partition.read_text().split("\n") if line.strip())
        where = np.array([int(splits.get(name, -1)) for name in names])
        if (where < 0).any():
            raise DataError(f"Problem {self.name!r}: {partition} has no line for {names[int(np.argmin(where))]}.")
        return {"names": names, "labels": torch.from_numpy(labels.astype(np.uint8)),
                **{split: np.flatnonzero(where == code).tolist() for split, code in SPLITS.items()}}

    def check_data(self) -> None:
        images = self.files[0]
        present = set(os.listdir(images)) if images.is_dir() else set()
        missing = [str((images / name).relative_to(self.root)) for name in self.table["names"] if name not in present]
        if missing:
            raise missing_file(self.root, missing, self.layout, self.name)
        empty = [split for split in SPLITS if not self.table[split]]
        if empty:
            raise DataError(f"Problem {self.name!r}: {self.files[2]} assigns no image to {empty} (0 train, 1 val, "
                            "2 test).")

    @property
    def train_size(self) -> int:
        return len(self.table["train"])

    def build_model(self) -> HardSharing:
        return famo_network()

    def fetch(self, split: str, positions: list[int], seed: int | None = None) -> tuple[Tensor, Tensor]:
        from PIL import Image

        rows = [self.table[split][p] for p in positions]
        folder, names = self.files[0], self.table["names"]
        pixels = []
        for row in rows:
            with Image.open(folder / names[row]) as image:
                pixels.append(np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        return images, self.table["labels"][rows].float()

    def losses(self, predictions: Any, targets: Tensor) -> list[Tensor]:
        return [nn.functional.binary_cross_entropy(p, targets[:, k:k + 1]) for k, p in enumerate(predictions)]

    def _counts(self, mtl: MTLWrapper, device: torch.device, split: str) -> tuple[Tensor, ...]:
        totals: list[Tensor] | None = None
        size = self.limit(len(self.table[split]))
        for images, labels in self.loader(split, self.eval_batch_size, size):
            probabilities = torch.cat(mtl(images.to(device, non_blocking=True)), dim=1)
            counts = f1_and_accuracy(probabilities, labels.to(device, non_blocking=True))
            totals = list(counts) if totals is None else [t + c for t, c in zip(totals, counts)]
        assert totals is not None
        return (*(t.cpu() for t in totals), torch.tensor(float(size)))

    def evaluate(self, mtl: MTLWrapper, device: torch.device) -> dict[str, dict[str, float]]:
        tp, fp, fn, right, size = self._counts(mtl, device, "test")
        f1 = f1_score(tp, fp, fn)
        return {name: {"f1": float(f1[k]), "accuracy": float(right[k] / size)} for k, name in enumerate(ATTRIBUTES)}

    def validation_score(self, mtl: MTLWrapper, device: torch.device) -> float:
        """Minus the mean F1 over the attributes on the validation split (FAMO selects on the mean F1)."""
        tp, fp, fn, _, _ = self._counts(mtl, device, "val")
        return -float(f1_score(tp, fp, fn).mean())

