"""A comparison's settings checked in one place (:class:`RunConfig`), whichever way they come in."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlzoo.cli import main
from mtlzoo.errors import ComparisonError
from mtlzoo.harness import RunConfig, compare
from mtlzoo.harness.problems import Toy2D


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "`steps` should be a positive int"),
    ({"seeds": 0}, "`seeds` should be a positive int"),
    ({"seeds": []}, "`seeds` should name at least one seed"),
    ({"threads": 0}, "`threads` should be a positive int"),
    ({"conflict_every": -1}, "`conflict_every` should be a non-negative int"),
    ({"reference": "mean"}, "`reference` should be 'ls' or 'single_task'"),
    ({"device": "gpu"}, "cannot be used here"),
])
def test_bad_settings_are_refused_on_construction(settings: dict, message: str) -> None:
    with pytest.raises(ComparisonError, match=message):
        RunConfig(**settings)
    with pytest.raises(ComparisonError, match=message):  # compare()'s keywords are the same object's fields
        compare(Toy2D(), ["ls"], **settings)


def test_the_command_reports_the_same_messages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--problem", "toy2d", "--strategies", "ls", "--steps", "0"]) == 2
    assert "`steps` should be a positive int" in capsys.readouterr().err


def test_an_output_folder_holding_runs_is_refused_by_one_check(tmp_path: Path) -> None:
    """The API and the command share RunConfig.check_out: runs of the problem in `out`, and no resume."""
    (tmp_path / "runs" / "toy2d").mkdir(parents=True)
    config = RunConfig(out=tmp_path)
    with pytest.raises(ComparisonError, match=r"runs/toy2d already holds runs: pass resume=True \(--resume\)"):
        config.check_out(["toy2d"])
    config.check_out(["gradnorm_synthetic"])  # another problem's folder is free
    RunConfig(out=tmp_path, resume=True).check_out(["toy2d"])
    with pytest.raises(ComparisonError, match="already holds runs"):
        compare(Toy2D(), ["ls"], config)
    with pytest.raises(TypeError, match="either `config` or its fields"):
        compare(Toy2D(), ["ls"], config, steps=3)
