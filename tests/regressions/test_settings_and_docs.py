"""Settings, checkpoints and documentation (regressions from the new-user audit, issue 7): a weighting's
repr, checkpoints with other settings, the reference tests without their extra, docstrings without
measurements."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtlzoo
from mtlzoo.errors import CheckpointMismatchError
from mtlzoo.roles import WeightingStrategy
from mtlzoo.strategy import StrategyInfo
from tests.helpers import assert_same_state, small_model

ROOT = Path(__file__).resolve().parents[2]


def test_item_9_a_weighting_with_a_weights_argument_prints() -> None:
    """Item 9: Strategy.extra_repr recursed forever when a constructor argument was named `weights`."""

    class Fixed(WeightingStrategy):
        info = StrategyInfo(name="test_fixed_weights", kind="weighting", summary="fixed")

        def __init__(self, num_tasks: int, weights: tuple[float, ...] = (1.0, 2.0)) -> None:
            super().__init__(num_tasks)
            self.fixed = torch.tensor(weights)

        def weights(self, losses: torch.Tensor) -> torch.Tensor:
            return self.fixed

    assert repr(Fixed(2, weights=(3.0, 4.0))) == "Fixed(num_tasks=2, weights=(3.0, 4.0))"
    print(mtlzoo.MTLWrapper(small_model(2), Fixed(2)))


@pytest.mark.parametrize(("saved", "loaded", "setting"), [
    ({"orthogonal_map": "cayley"}, {"orthogonal_map": "householder"}, "orthogonal_map"),
    ({"normalize_losses": True}, {"normalize_losses": False}, "normalize_losses"),
    ({"burn_in_period": 5}, {"burn_in_period": 20}, "burn_in_period"),
])
def test_item_10_a_checkpoint_with_other_settings_is_refused(saved: dict, loaded: dict, setting: str) -> None:
    """Item 10: a cayley checkpoint loaded into a householder strategy with "All keys matched"."""
    source = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, **saved)
    target = mtlzoo.MTLWrapper(small_model(), "rotograd", rotation_shape=4, **loaded)
    before = copy.deepcopy(target.state_dict())
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=f"{setting}: checkpoint"):
            target.load_state_dict(source.state_dict(), strict=strict)
    assert_same_state(before, target.state_dict())  # refused before anything loads
    with pytest.raises(CheckpointMismatchError, match=setting):
        target.strategy.load_state_dict(source.strategy.state_dict())


def test_item_23_the_reference_tests_skip_without_the_extra(tmp_path: Path) -> None:
    """Item 23: without the `reference` extra the reference tests failed at collection."""
    (tmp_path / "rotograd.py").write_text("raise ImportError('the reference extra is not installed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/strategies/test_rotograd_reference.py"],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: every test skipped, none collected
    assert "skipped" in result.stdout and "error" not in result.stdout.lower()


def test_item_25_docstrings_carry_no_measurements() -> None:
    """Item 25: benchmark ratios and a claim about a torch bug in docstrings go stale."""

    for entry in mtlzoo.list_strategies():
        if entry.origin.builtin:
            module = sys.modules[entry.cls.__module__]
            text = (entry.cls.__doc__ or "") + (module.__doc__ or "")
            assert not re.search(r"\d(\.\d+)?x\b", text), f"{entry.name}: a ratio in a docstring"
    bank = (ROOT / "mtlzoo" / "strategies" / "_rotation_bank.py").read_text()
    assert "set_num_threads" not in bank and "torch 2.13" not in bank
