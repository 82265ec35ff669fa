r"""Dense scene understanding as MTAN, CAGrad, Nash-MTL and FAMO set it up (``nyuv2``, ``cityscapes``).

**The data** is MTAN's preprocessed release (Liu, Johns & Davison, CVPR 2019): one NumPy file per
sample and modality, ``<split>/<modality>/<i>.npy`` for ``i = 0 .. n-1``, ``split`` ``train`` or
``val`` (the test set): ``image`` (H, W, 3) float RGB in [0, 1]; the class map (H, W) with -1 where
unlabelled; ``depth`` (H, W, 1), 0 where unknown; ``normal`` (H, W, 3) unit vectors, 0 where unknown.

**The model** is the hard-sharing SegNet of Nash-MTL's code (:func:`segnet`); **the losses** are
Nash-MTL's ``calc_loss`` (:func:`segmentation_loss`, :func:`depth_loss`, :func:`normal_loss`).

**The metrics**, over every evaluated pixel of the test set at once (LibMTL's choice; Nash-MTL's
code averages per-batch values over batches, which differs where batches hold unequal numbers of
valid pixels):

- ``miou``: the mean over classes of TP / (TP + FP + FN), over the classes present in the ground
  truth or the predictions (a class absent from both has no IoU and is left out of the mean, where
  Nash-MTL's code would give NaN); ``pixel_acc``: the share of labelled pixels classified right;
- ``abs_err`` = mean |d - d*|, ``rel_err`` = mean |d - d*| / d* over pixels with a depth d* != 0;
- ``mean_angle``, ``median_angle``: the angle in degrees between predicted and true normals;
  ``within_11.25`` ``within_22.5`` ``within_30``: the share of pixels whose angle is below.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlzoo.errors import DataError
from mtlzoo.harness.problems.base import Metric
from mtlzoo.sharing import HardSharing

FILTERS = (64, 128, 256, 512, 512)
SCALES = (1.0, 1.2, 1.5)
"""The random scale-crop's zoom factors (MTAN issue 34, as Nash-MTL's and FAMO's loaders use them)."""
ANGLES = (11.25, 22.5, 30.0)

SEGMENTATION = (Metric("miou", True, "mean intersection over union of the classes"),
                Metric("pixel_acc", True, "share of labelled pixels classified right"))
DEPTH = (Metric("abs_err", False, "mean absolute depth error"),
         Metric("rel_err", False, "mean relative depth error"))
NORMAL = (Metric("mean_angle", False, "mean angle error of the normals (degrees)"),
          Metric("median_angle", False, "median angle error of the normals (degrees)"),
          *(Metric(f"within_{a:g}", True, f"share of pixels with an angle error below {a:g} degrees")
            for a in ANGLES))


# ---------------------------------------------------------------------------- model
def _conv(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out),
                         nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """The shared encoder-decoder of Nash-MTL's hard-sharing SegNet (``SegNetSplit``, "standard"): five stages of
    64-128-256-512-512 channels, max-pooling indices reused to unpool; (B, 3, H, W) -> (B, 64, H, W), H, W % 32 == 0."""

    def __init__(self, filters: Sequence[int] = FILTERS) -> None:
        super().__init__()
        f = list(filters)
        self.encoder = nn.ModuleList([_conv(3 if i == 0 else f[i - 1], f[i]) for i in range(5)])
        self.encoder_convs = nn.ModuleList(
            [_conv(f[i], f[i]) if i < 2 else nn.Sequential(_conv(f[i], f[i]), _conv(f[i], f[i])) for i in range(5)])
        self.decoder = nn.ModuleList([_conv(f[i], f[max(i - 1, 0)]) for i in range(5)])
        self.decoder_convs = nn.ModuleList([_conv(f[0], f[0]) if i < 2 else
                                            nn.Sequential(_conv(f[i - 1], f[i - 1]), _conv(f[i - 1], f[i - 1]))
                                            for i in range(5)])
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        indices = []
        for encode, convs in zip(self.encoder, self.encoder_convs):
            x, index = self.pool(convs(encode(x)))
            indices.append(index)
        for i in reversed(range(5)):
            x = self.decoder_convs[i](self.decoder[i](self.unpool(x, indices[i])))
        return x


class _Head(nn.Module):
    def __init__(self, channels: int, outputs: int, finish: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, outputs, 1))
        self.finish = finish

    def forward(self, z: Tensor) -> Tensor:
        y = self.layers(z)
        if self.finish == "log_softmax":
            return F.log_softmax(y, dim=1)
        if self.finish == "unit":
            return y / torch.norm(y, p=2, dim=1, keepdim=True)
        return y


def segnet(classes: int, normals: bool) -> HardSharing:
    """The SegNet with the heads of the segmentation, depth (and normal) tasks, each a 3x3 and a 1x1 convolution
    (log-softmax for the classes, the raw value for depth, unit length for normals), initialised as Nash-MTL's
    code does (Xavier-normal convolutions, zero biases, unit batch-norm scales)."""
    heads = [_Head(FILTERS[0], classes, "log_softmax"), _Head(FILTERS[0], 1, "none"),
             *([_Head(FILTERS[0], 3, "unit")] if normals else [])]
    model = HardSharing(SegNet(), heads)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


# ---------------------------------------------------------------------------- losses
def _valid(target: Tensor) -> Tensor:
    """(B, 1, H, W): the pixels whose ground truth does not sum to 0 over its channels."""
    return (target.sum(dim=1, keepdim=True) != 0).to(target.dtype)


def segmentation_loss(log_probabilities: Tensor, labels: Tensor) -> Tensor:
    """The mean negative log-likelihood over labelled pixels (label -1: unlabelled)."""
    return F.nll_loss(log_probabilities, labels, ignore_index=-1)


def depth_loss(prediction: Tensor, depth: Tensor) -> Tensor:
    """The mean absolute error over the pixels with a depth."""
    mask = _valid(depth)
    return ((prediction - depth).abs() * mask).sum() / mask.sum().clamp_min(1)


def normal_loss(prediction: Tensor, normal: Tensor) -> Tensor:
    """One minus the mean dot product of predicted and true normals over the pixels with a normal."""
    mask = _valid(normal)
    return 1 - (prediction * normal * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------- metrics
class DenseMetrics:
    """Accumulates the test metrics of the dense tasks over batches (:meth:`update`), then reports them."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.confusion = torch.zeros(classes, classes, dtype=torch.int64)
        self.depth = torch.zeros(3, dtype=torch.float64)  # sum |d - d*|, sum |d - d*| / d*, count
        self.angles: list[Tensor] = []

    def update_segmentation(self, log_probabilities: Tensor, labels: Tensor) -> None:
        predicted = log_probabilities.argmax(1).flatten()
        labels = labels.flatten()
        keep = (labels >= 0) & (labels < self.classes)
        pairs = self.classes * labels[keep] + predicted[keep]
        self.confusion += torch.bincount(pairs, minlength=self.classes ** 2).reshape(self.classes, -1).cpu()

    def update_depth(self, prediction: Tensor, depth: Tensor) -> None:
        mask = _valid(depth).bool()
        truth, predicted = depth[mask].double(), prediction[mask].double()
        error = (predicted - truth).abs()
        self.depth += torch.stack([error.sum(), (error / truth).sum(), torch.tensor(float(len(truth)))]).cpu()

    def update_normal(self, prediction: Tensor, normal: Tensor) -> None:
        mask = _valid(normal)[:, 0].bool()
        cosine = (prediction * normal).sum(dim=1)[mask].clamp(-1, 1)
        self.angles.append(torch.rad2deg(torch.acos(cosine.double())).float().cpu())

    def segmentation(self) -> dict[str, float]:
        h = self.confusion.double()
        union = h.sum(0) + h.sum(1) - h.diag()
        present = union > 0
        return {"miou": float((h.diag()[present] / union[present]).mean()),
                "pixel_acc": float(h.diag().sum() / h.sum())}

    def depth_errors(self) -> dict[str, float]:
        total, relative, count = self.depth.tolist()
        return {"abs_err": total / count, "rel_err": relative / count}

    def normal_errors(self) -> dict[str, float]:
        angles = torch.cat(self.angles)
        n = len(angles)
        low = float(torch.kthvalue(angles, (n + 1) // 2).values)
        high = float(torch.kthvalue(angles, n // 2 + 1).values)  # the two middle values: NumPy's median
        return {"mean_angle": float(angles.double().mean()), "median_angle": (low + high) / 2,
                **{f"within_{angle:g}": float((angles < angle).double().mean()) for angle in ANGLES}}


# ---------------------------------------------------------------------------- data
def stack_batch(folder: Path, modalities: Sequence[str], indices: Sequence[int]) -> list[Tensor]:
    """The batch as (B, C, H, W) float tensors: image, labels (B, H, W) long, then depth and normals."""
    stacked = [torch.from_numpy(np.stack([np.load(folder / modality / f"{i}.npy") for i in indices]))
               for modality in modalities]
    return [t.long() if m == 1 else t.permute(0, 3, 1, 2).float().contiguous() for m, t in enumerate(stacked)]


def scale_crop_flip(image: Tensor, labels: Tensor, depth: Tensor, normal: Tensor | None,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Nash-MTL's and FAMO's augmentation, batched: per sample, zoom by a factor ``s`` drawn from
    :data:`SCALES` into a random ``int(H/s) x int(W/s)`` window, resized back (bilinear with aligned
    corners for the image and normals, nearest for classes and depth), depth divided by ``s``; then a
    horizontal flip with probability 1/2 (the normals' x component negated)."""
    batch, _, height, width = image.shape
    scale = torch.tensor(SCALES, dtype=torch.float64)[torch.randint(len(SCALES), (batch,), generator=generator)]
    crop_h, crop_w = (height / scale).long(), (width / scale).long()
    top = (torch.rand(batch, generator=generator) * (height - crop_h + 1)).long()
    left = (torch.rand(batch, generator=generator) * (width - crop_w + 1)).long()
    flip = torch.rand(batch, generator=generator) < 0.5

    def bilinear(x: Tensor) -> Tensor:  # F.interpolate(crop, (H, W), "bilinear", align_corners=True), batched
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = (crop_w - 1) / (width - 1)
        theta[:, 0, 2] = -1 + 2 * left / (width - 1) + (crop_w - 1) / (width - 1)
        theta[:, 1, 1] = (crop_h - 1) / (height - 1)
        theta[:, 1, 2] = -1 + 2 * top / (height - 1) + (crop_h - 1) / (height - 1)
        grid = F.affine_grid(theta.to(x.dtype), [batch, x.shape[1], height, width], align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True)

    # F.interpolate(crop, (H, W), "nearest") reads source index floor(i * h / H)
    rows = top[:, None] + torch.div(torch.arange(height)[None] * crop_h[:, None], height, rounding_mode="floor")
    cols = left[:, None] + torch.div(torch.arange(width)[None] * crop_w[:, None], width, rounding_mode="floor")
    b = torch.arange(batch)[:, None, None]
    labels = labels[b, rows[:, :, None], cols[:, None, :]]
    zoom = scale.view(-1, 1, 1, 1).to(depth.dtype)
    depth = depth[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2) / zoom
    image = bilinear(image)
    where = flip.view(-1, 1, 1, 1)
    image, depth = torch.where(where, image.flip(-1), image), torch.where(where, depth.flip(-1), depth)
    labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
    if normal is not None:
        normal = bilinear(normal)
        normal = torch.where(where, normal.flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1), normal)
    return image, labels, depth, normal


def count_samples(folder: Path) -> int:
    return len([name for name in os.listdir(folder) if name.endswith(".npy")]) if folder.is_dir() else 0


def first_missing(root: Path, split: str, modalities: Sequence[str], size: int) -> list[str]:
    """The expected files of ``split`` that ``root`` lacks, as paths relative to ``root``."""
    missing = []
    for modality in modalities:
        folder = root / split / modality
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        missing += [f"{split}/{modality}/{i}.npy" for i in range(size) if f"{i}.npy" not in present]
    return missing


def check_shapes(root: Path, split: str, modalities: Sequence[str], channels: Sequence[int | None],
                 problem: str) -> tuple[int, int]:
    """The (H, W) of sample 0 of ``split``, after checking every modality's shape there.

    Raises:
        DataError: A file of another shape, or a size the SegNet cannot pool five times.
    """
    height = width = None
    for modality, depth in zip(modalities, channels):
        path = root / split / modality / "0.npy"
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError) as error:
            raise DataError(f"Problem {problem!r}: {path} is not a NumPy array file: {error}") from None
        expected = "(H, W)" if depth is None else f"(H, W, {depth})"
        if len(shape) != (2 if depth is None else 3) or (depth is not None and shape[2] != depth) \
                or (height is not None and shape[:2] != (height, width)):
            raise DataError(f"Problem {problem!r}: {path} has shape {tuple(shape)}; MTAN's format stores "
                            f"{modality} as {expected}" + ("" if height is None else f" with H, W = {height}, {width}")
                            + ".")
        height, width = shape[:2]
    assert height is not None and width is not None
    if height % 32 or width % 32:
        raise DataError(f"Problem {problem!r}: the images of {root / split} are {height} x {width}; the SegNet "
                        "pools five times, so both sides should be multiples of 32 (MTAN's 288 x 384, 128 x 256).")
    return height, width

