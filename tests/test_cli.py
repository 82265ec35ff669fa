"""The `mtlzoo` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mtlzoo
from mtlzoo.cli import main


def test_list_prints_a_table_of_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "aliases", "kind", "needs", "paper", "origin"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {entry.name for entry in mtlzoo.list_strategies()}
    assert "Javaloy & Valera, ICLR 2022" in rows["rotograd"] and "built-in" in rows["rotograd"]
    assert "rotateonly" in rows["rotate_only"]


def test_list_json_has_one_record_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [e.name for e in mtlzoo.list_strategies()]
    by_name = {r["name"]: r for r in records}
    assert by_name["rotograd_norm"]["aliases"] == ["rotogradnorm"]
    assert by_name["rotograd_norm"]["required"] == ["alpha"]
    assert by_name["rotograd"]["kind"] == "surgery"
    assert by_name["rotograd"]["needs"] == mtlzoo.get_strategy("rotograd").info.needs != by_name["ls"]["needs"]
    assert by_name["ls"]["origin"] == "built-in" and not by_name["ls"]["adapts_representation"]
    assert by_name["rotograd"]["adapts_representation"] and by_name["rotograd"]["learnable"]
    assert by_name["rotograd"]["paper"]["year"] == 2022


def test_list_filters(capsys: pytest.CaptureFixture[str]) -> None:
    main(["list", "roto*", "--format", "json"])
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["rotograd", "rotograd_norm"]
    main(["list", "--kind", "weighting", "--format", "json"])
    assert all(r["kind"] == "weighting" for r in json.loads(capsys.readouterr().out))
    main(["list", "--where", "representation", "--format", "json"])
    found = json.loads(capsys.readouterr().out)
    assert {"rotograd", "rotate_only"} <= {r["name"] for r in found}
    assert all(r["request"]["where"] == "representation" for r in found)


def test_list_help_says_in_process_registrations_are_not_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 7, item 21: `mtlzoo list` runs in a process of its own; its help says what it cannot show."""
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "entry-point group" in text
    assert "@mtlzoo.register_strategy" in text and "are not shown" in text and "mtlzoo.list_strategies()" in text


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "mtlzoo", "list", "--format", "json"], check=True,
                            capture_output=True, text=True)
    assert {"ls", "rotograd"} <= {r["name"] for r in json.loads(result.stdout)}


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as error:
        main(["frobnicate"])
    assert error.value.code == 2
