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


def write_celeba(root: Path, *, sizes: tuple[int, int, int] = (6, 3, 4), seed: int = 0) -> Path:
    """The official release's layout: ``Img/img_align_celeba/*.jpg``, ``Anno/list_attr_celeba.txt`` (count,
    the 40 names, then ``name v1 .. v40`` with values 1 / -1) and ``Eval/list_eval_partition.txt`` (``name 0|1|2``)."""
    from PIL import Image

    from mtlzoo.harness.problems.celeba import ATTRIBUTES

    rng = np.random.default_rng(seed)
    images = root / "Img" / "img_align_celeba"
    images.mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    total = sum(sizes)
    names = [f"{i + 1:06d}.jpg" for i in range(total)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(images / name)
    values = rng.choice([-1, 1], size=(total, len(ATTRIBUTES)))
    lines = [str(total), " ".join(ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    (root / "Anno" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    splits = [0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]
    (root / "Eval" / "list_eval_partition.txt").write_text("".join(f"{n} {s}\n" for n, s in zip(names, splits)))
    return root


def write_qm9(root: Path, *, molecules: int = 24, seed: int = 0) -> Path:
    """torch_geometric's pre-processed release, ``raw/qm9_v3.pt``: a list of dicts (x (n, 11), edge_index, one-hot
    edge_attr (E, 4), y (1, 19), pos, z, ...), which ``QM9(root)`` processes into ``processed/data_v3.pt``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    data = []
    for i in range(molecules):
        n = int(torch.randint(3, 7, (), generator=generator))
        chain = torch.arange(n - 1)
        edge_index = torch.cat([torch.stack([chain, chain + 1]), torch.stack([chain + 1, chain])], dim=1)
        bond = torch.randint(0, 4, (n - 1,), generator=generator).repeat(2)
        data.append({"x": torch.rand(n, 11, generator=generator), "edge_index": edge_index,
                     "edge_attr": torch.nn.functional.one_hot(bond, 4).float(),
                     "y": torch.randn(1, 19, generator=generator) * torch.logspace(-1, 2, 19).view(1, -1),
                     "pos": torch.randn(n, 3, generator=generator),
                     "z": torch.randint(1, 10, (n,), generator=generator),
                     "name": f"gdb_{i + 1}", "idx": torch.tensor([i])})
    (root / "raw").mkdir(parents=True)
    torch.save(data, root / "raw" / "qm9_v3.pt")
    return root
