"""The README's code runs, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_quickstart_and_training_loop_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The quickstart, then the documented loop (micro-batches, autocast, a GradScaler, epochs) in its namespace."""
    quickstart, loop = blocks("python")
    namespace: dict = {}
    exec(compile(quickstart, "README.md", "exec"), namespace)
    assert capsys.readouterr().out.strip() == "torch.Size([4, 1])"
    mtl = namespace["mtl"].train()
    before = mtl.strategy.step
    exec(compile(loop, "README.md", "exec"), namespace)
    assert mtl.strategy.step == before + 2 * len(namespace["loader"])


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    main_job, tests = [block.strip() for block in blocks("bash")]
    assert main_job.startswith("python -m pip install torch==") and main_job.endswith("mtlzoo compare")
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci
    assert "python -m mtlzoo compare --out" in ci  # CI runs the main job, then checks its results
