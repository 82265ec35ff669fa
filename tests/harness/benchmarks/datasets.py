"""Miniature data sets in exactly the on-disk formats the benchmarks read (generated, a few samples each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_scenes(root: Path, *, classes: int, normals: bool, label_folder: str, sizes: tuple[int, int] = (5, 3),
                 height: int = 32, width: int = 64, seed: int = 0) -> Path:
    """MTAN's per-sample arrays: ``<split>/{image,<label_folder>,depth[,normal]}/<i>.npy`` (float32, H x W [x C])."""
    rng = np.random.default_rng(seed)
    for split, size in zip(("train", "val"), sizes):
        for i in range(size):
            arrays = {
                "image": rng.random((height, width, 3), dtype=np.float32),
                label_folder: rng.integers(-1, classes, (height, width)).astype(np.float32),
                "depth": (rng.random((height, width, 1)) * 5 * (rng.random((height, width, 1)) > 0.1))
                .astype(np.float32),
            }
            if normals:
                vectors = rng.normal(size=(height, width, 3))
                vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
                vectors[rng.random((height, width)) < 0.1] = 0
                arrays["normal"] = vectors.astype(np.float32)
            for modality, array in arrays.items():
                folder = root / split / modality
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{i}.npy", array)
    return root


def write_nyuv2(root: Path, **kwargs: object) -> Path:
    return write_scenes(root, classes=13, normals=True, label_folder="label", **kwargs)  # type: ignore[arg-type]


def write_cityscapes(root: Path, **kwargs: object) -> Path:
    return write_scenes(root, classes=7, normals=False, label_folder="label_7", **kwargs)  # type: ignore[arg-type]
