"""A wrong or incomplete data folder: an error naming the missing file and the expected layout, exit status 2, and
nothing written to the output folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mtlzoo.cli import main
from tests.harness.benchmarks import datasets


def _remove(relative: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).unlink()


CASES = [
    ("nyuv2", datasets.write_nyuv2, _remove("train/normal/2.npy"), "train/normal/2.npy", "train/image/<i>.npy"),
    ("nyuv2", datasets.write_nyuv2, _remove("val/depth/0.npy"), "val/depth/0.npy", "val/..."),
    ("nyuv2", datasets.write_nyuv2, lambda root: np.save(root / "train/normal/0.npy", np.zeros((32, 64))),
     "train/normal/0.npy has shape (32, 64)", "(H, W, 3)"),
    ("cityscapes", datasets.write_cityscapes, _remove("train/label_7/1.npy"), "train/label_7/1.npy",
     "train/label_7/<i>.npy"),
    ("celeba", datasets.write_celeba, _remove("Img/img_align_celeba/000004.jpg"), "Img/img_align_celeba/000004.jpg",
     "Anno/list_attr_celeba.txt"),
    ("celeba", datasets.write_celeba, _remove("Eval/list_eval_partition.txt"), "Anno/list_attr_celeba.txt",
     "Eval/list_eval_partition.txt"),
    ("qm9", datasets.write_qm9, _remove("raw/qm9_v3.pt"), "processed/data_v3.pt", "raw/qm9_v3.pt"),
]


@pytest.mark.parametrize(("name", "write", "damage", "named", "layout"), CASES,
                         ids=[f"{c[0]}-{c[3].split()[0]}" for c in CASES])
def test_a_damaged_data_folder_is_named_and_nothing_is_written(
        name: str, write: Callable[[Path], Path], damage: Callable[[Path], None], named: str, layout: str,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write(tmp_path / "data")
    damage(root)
    out = tmp_path / "out"
    assert main(["compare", "--problem", f"{name}:scale=smoke:workers=0", "--data", str(root), "--strategies",
                 "ls,pcgrad", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert named in error and layout in error, error
    assert not out.exists()


def test_without_data_the_message_says_how_to_give_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["compare", "--problem", "nyuv2", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--data PATH" in error and "train/image/<i>.npy" in error
    assert not (tmp_path / "out").exists()


def test_data_for_problems_that_read_none_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["compare", "--problem", "toy2d", "--data", str(tmp_path)]) == 2
    assert "reads a data set from disk" in capsys.readouterr().err


def test_help_problem_lists_the_benchmarks_and_describes_one_without_its_data(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--help-problem"]) == 0
    listing = capsys.readouterr().out
    for name in ("nyuv2", "cityscapes", "celeba", "qm9", "toy2d"):
        assert f"  {name} " in listing
    assert main(["compare", "--problem", "qm9", "--help-problem"]) == 0
    described = capsys.readouterr().out
    assert "Navon et al." in described and "raw/qm9_v3.pt" in described and "'epochs': 300" in described
