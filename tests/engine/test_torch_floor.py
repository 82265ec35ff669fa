"""Issue 18: the ``torch>=`` floor in pyproject.toml is a version CI actually runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_torch_floor_is_the_version_ci_installs() -> None:
    floors = re.findall(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    installed = re.findall(r"pip install torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert len(floors) == 1, f"pyproject.toml should state one torch floor; found {floors}"
    assert installed, "CI no longer pins the torch version it installs: pin it, or test the floor another way"
    floor = floors[0]
    assert all(version == floor or version.startswith(floor + ".") for version in installed), \
        f"pyproject.toml says torch>={floor}, CI runs {installed}: raise the floor or add a run at the floor"
