"""``benchmarks/vs_reference.py`` (and its ``--growth``): rows, ratios, missing packages, memory, plots.

No timed assertion here (times are only checked to be finite and positive); the figures come from
``python benchmarks/vs_reference.py`` on a quiet machine (docs/performance.md). The script lives at
the repository's root, outside the installed package; the tests import it as ``benchmarks.vs_reference``
(the repository's root is on the path under pytest) and run it as a script once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import vs_reference as ref
from benchmarks.vs_reference import main
from mtlzoo.cli import main as mtlzoo_main

TINY = ["--rotograd-settings", "8x2", "--dim", "8", "--tasks", "2", "--memory-setting", "8x4", "--memory-chunk", "2",
        "--steps", "3", "--warmup", "1"]


def _finite_positive(spread: dict[str, float]) -> bool:
    return all(math.isfinite(spread[q]) and spread[q] > 0 for q in ("median", "p25", "p75"))


def _expected_labels(section: str) -> set[str]:
    setting = ref.Setting.make(8, 2)
    builders = {"rotograd": ref._rotograd_entries, "torchjd": ref._torchjd_entries,
                "weighting": ref._weighting_entries}
    return {entry.label for entry in builders[section](setting)}


def test_vs_reference_cli_reports_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12's table: rotograd 0.1.6.0's four classes, the floor, torchjd's six aggregators, the autograd loop,
    mtlzoo's strategies on both targets and the weightings, each a finite positive ratio to plain training, with
    its quartiles; the memory rows carry a peak in bytes. (Reference: the list of the issue's "Deliver" part.)"""
    pytest.importorskip("rotograd")
    pytest.importorskip("torchjd")
    out = tmp_path / "reference.json"
    assert main([*TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rotograd: d=8, K=2" in text and "torchjd: d=8, K=2" in text and "memory: peak" in text
    report = json.loads(out.read_text())
    assert report["environment"]["rotograd"] == "0.1.6.0" and report["environment"]["torchjd"].startswith("0.18")
    by_section: dict[str, dict[str, dict[str, Any]]] = {}
    for record in report["results"]:
        by_section.setdefault(record["section"], {})[record["label"]] = record
    for section in ("rotograd", "torchjd", "weighting"):
        records = by_section[section]
        assert set(records) == _expected_labels(section)
        for label, record in records.items():
            assert record["status"] == "ok", (label, record["error"])
            assert _finite_positive(record["ratio"]) and record["steps"] == 3
            assert "ls" in record["vs"] or label == "ls"
    assert {"rotograd RotoGradNorm", "rotograd_norm", ref.FLOOR} <= set(by_section["rotograd"])
    assert {"torchjd NashMTL", "nash_mtl:target=representation", "K autograd.grad calls"} <= set(by_section["torchjd"])
    assert {"famo", "gradnorm", "uw"} <= set(by_section["weighting"])
    assert by_section["rotograd"]["rotograd"]["vs"][ref.FLOOR]["median"] > 0
    assert by_section["torchjd"][ref.PLAIN]["ratio"]["median"] == 1.0
    memory = by_section["memory"]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in memory.values())
    assert memory["Jacobian, all K at once"]["peak_bytes"] > memory["ls"]["peak_bytes"]


def test_missing_reference_packages_give_not_installed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference package that cannot be imported gives "not installed" rows; mtlzoo's rows still run."""
    for module in ("rotograd", "torchjd", "torchjd.aggregation", "torchjd.autojac"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    report = ref.vs_reference(sections=["rotograd", "torchjd"], rotograd_settings=[(8, 2)], dim=8, tasks=2, steps=2,
                              warmup=1)
    assert report["environment"]["rotograd"] is None and report["environment"]["torchjd"] is None
    rows = report["results"]
    missing = [r for r in rows if r["package"] in ("rotograd", "torchjd")]
    assert len(missing) == len(ref.ROTOGRAD_CLASSES) + len(ref.TORCHJD_AGGREGATORS)
    assert all(r["status"] == "not installed" and "not installed" in r["error"] for r in missing)
    assert all(r["status"] == "ok" for r in rows if r["package"] in ("mtlzoo", "-"))
    tables = ref.report_rows(report)
    assert any("not installed" in row for _, _, table in tables for row in table)


def test_autograd_loop_and_torchjd_mean_take_the_same_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written K ``autograd.grad`` loop and torchjd's ``Mean`` both apply the mean of the task gradients on
    the backbone and the summed loss's gradient on the heads: after one step from the same model they agree
    (reference: torchjd 0.18's ``mtl_backward`` + ``jac_to_grad(Mean())``), and both differ from a plain step."""
    pytest.importorskip("torchjd")
    built: list[Any] = []
    original = ref.reference_model
    monkeypatch.setattr(ref, "reference_model", lambda *args: built.append(original(*args)) or built[-1])
    setting = ref.Setting.make(8, 3)
    for make in (ref.autograd_loop_step, lambda s: ref.torchjd_step(s, "Mean"), ref.plain_step):
        make(setting)()
    after = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in built]
    assert len(after) == 3
    assert torch.allclose(after[0], after[1], atol=1e-6)
    assert not torch.allclose(after[0], after[2], atol=1e-6)


def test_the_second_adam_baseline_steps_k_numbers_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """"ls + a second Adam" is the target of a strategy whose K parameters have their own Adam: that Adam must
    take a real step each time (a parameter without a gradient would be skipped, a cheaper baseline)."""
    made: list[torch.optim.Adam] = []

    class Recorded(torch.optim.Adam):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "Adam", Recorded)
    step = ref.mtlzoo_step(ref.Setting.make(6, 3), "ls", second_optimizer=True)
    for _ in range(2):
        step()
    (adam,) = made
    (param,) = adam.param_groups[0]["params"]
    assert param.shape == (3,) and float(adam.state[param]["step"]) == 2 and param.detach().abs().min() > 0


def test_floor_step_back_propagates_into_the_rotations() -> None:
    """The RotoGrad floor computes ``dR_k`` (K d x d gradients) besides a plain step."""
    rotations = ref.floor_step(ref.Setting.make(6, 3))()
    assert isinstance(rotations, torch.Tensor) and rotations.shape == (3, 6, 6) and rotations.abs().sum() > 0


def test_peak_bytes_counts_live_tensors() -> None:
    """The profiler-based peak: two live 1000 x 1000 float32 tensors at once give 8 MB, whatever was freed."""

    def step() -> object:
        a = torch.ones(1000, 1000)
        b = a * 2
        del a
        return b + 1  # a freed before c exists: the peak is two tensors, not three

    assert ref.peak_bytes(step) == pytest.approx(8_000_000, rel=0.01)


def test_chunked_jacobian_peak_is_below_all_at_once() -> None:
    """With ``jacobian_chunk_size=2`` the Jacobian route's peak at K=16 stays below batching all 16 at once.

    On this small model (d=16) the vmapped backward's per-task intermediates weigh as much as the
    Jacobian itself, so chunking them shows; the Jacobian route's peak stays above a plain step's. (At
    d=512, K=40 the K x n Jacobian and its copies dominate: ``mtlzoo bench --vs-reference`` reports it.)"""
    setting = ref.Setting.make(16, 16)
    whole = ref.peak_bytes(ref.mtlzoo_step(setting, ref.JacobianProbe(16), chunk=16))
    chunked = ref.peak_bytes(ref.mtlzoo_step(setting, ref.JacobianProbe(16), chunk=2))
    plain = ref.peak_bytes(ref.plain_step(setting))
    assert plain < chunked < whole


def test_growth_has_one_record_per_axis_setting_and_strategy(tmp_path: Path) -> None:
    """``growth``: K varies at the base d, then d at the base K; each record a finite positive ratio to plain."""
    report = ref.growth(["ls", "upgrad:target=representation"], tasks=(2, 3), dims=(8, 16), base=(8, 2), steps=2,
                        warmup=1)
    keys = [(r["axis"], r["dim"], r["tasks"], r["label"]) for r in report["results"]]
    labels = ("ls", "upgrad:target=representation")
    assert keys == [("tasks", 8, k, s) for k in (2, 3) for s in labels] + [("dim", d, 2, s) for d in (8, 16)
                                                                            for s in labels]
    assert all(r["status"] == "ok" and _finite_positive(r["ratio"]) for r in report["results"])
    tables = ref.growth_rows(report)
    assert [header for _, header, _ in tables] == [["strategy", "2", "3"], ["strategy", "8", "16"]]


def test_growth_plots_are_written(tmp_path: Path) -> None:
    """``save_growth_plots`` writes growth_tasks.png and growth_dim.png, one line per strategy, not blank."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    def record(axis: str, d: int, k: int, label: str, median: float) -> dict[str, Any]:
        return {"axis": axis, "dim": d, "tasks": k, "label": label, "status": "ok",
                "ratio": {"median": median, "p25": 0.9 * median, "p75": 1.1 * median}}

    report = {"settings": {"batch": 256}, "results": [
        *(record("tasks", 128, k, s, m * k) for k in (2, 4, 8) for s, m in (("ls", 1.0), ("upgrad", 2.0))),
        *(record("dim", d, 4, s, m * d / 64) for d in (64, 128) for s, m in (("ls", 1.0), ("upgrad", 2.0)))]}
    figure = ref.growth_figure(report, "tasks")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["ls", "upgrad"]
    paths = ref.save_growth_plots(report, tmp_path)
    assert [p.name for p in paths] == ["growth_tasks.png", "growth_dim.png"]
    for path in paths:
        image = imread(path)
        assert image.std() > 0.01


def test_vs_reference_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad sections and pairs are usage errors (exit 2), said on stderr."""
    assert main(["--sections", "rotograd,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["--rotograd-settings", "128"]) == 2
    assert "DxK" in capsys.readouterr().err


def test_docs_hook_renders_the_committed_suite(tmp_path: Path) -> None:
    """The performance page's markers: every row of a report (a "not installed" one too) becomes a Markdown table
    row, and a missing file becomes a warning, not an error (reference: the bench table's marker)."""
    from tests.test_docs import load_hook

    hook = load_hook("mtlzoo_docs")
    report = {"settings": {"steps": 7}, "environment": {"torch": "2.x", "threads": 2, "rotograd": None,
                                                         "torchjd": "0.18.0"},
              "results": [
                  {"section": "torchjd", "dim": 8, "tasks": 2, "label": ref.PLAIN, "package": "-", "status": "ok",
                   "note": "", "ratio": {"median": 1.0, "p25": 1.0, "p75": 1.0}, "vs": {}},
                  {"section": "rotograd", "dim": 8, "tasks": 2, "label": "rotograd RotoGrad", "package": "rotograd",
                   "status": "not installed", "error": "rotograd is not installed", "note": ""},
                  {"section": "memory", "dim": 8, "tasks": 2, "label": "upgrad", "route": "gramian",
                   "package": "mtlzoo", "status": "ok", "peak_bytes": 3 * 2**20, "jacobian_bytes": 2**20}]}
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(report))
    page = hook.reference_tables(path)
    assert "rotograd not installed, torchjd 0.18.0" in page and "7 interleaved steps" in page and "wall-clock" in page
    assert f"| {ref.PLAIN} | - | 1.00x [1.00, 1.00] |" in page
    assert "| rotograd RotoGrad | rotograd | - | - | - | not installed |" in page
    assert "| upgrad | gramian | 3.0 MiB | - | 2.0 MiB |" in page
    assert "warning" in hook.reference_tables(tmp_path / "missing.json")


def test_growth_cli_with_cpu_clock_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``vs_reference.py --growth --clock cpu --plot DIR``: the tables on stdout, the JSON says its clock, two PNGs."""
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    try:
        assert main(["--growth", "--growth-strategies", "ls,uw", "--growth-tasks", "2", "--growth-dims",
                     "8", "--steps", "2", "--warmup", "1", "--clock", "cpu", "--out", str(tmp_path / "g.json"),
                     "--plot", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "growth with K (d=128)" in capsys.readouterr().out
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["settings"]["clock"] == "cpu" and report["environment"]["threads"] == 1
    assert [r["label"] for r in report["results"]] == ["ls", "uw", "ls", "uw"]
    assert (tmp_path / "growth_tasks.png").exists() and (tmp_path / "growth_dim.png").exists()


def test_the_script_runs_from_the_repository_and_mtlzoo_bench_points_at_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python benchmarks/vs_reference.py`` runs as a script (here: its --help, and one tiny growth), and
    ``mtlzoo bench --vs-reference`` (the former place) says where the benchmark went instead of failing vaguely."""
    import subprocess

    script = Path(ref.__file__)
    root = str(script.parent.parent)  # this checkout's mtlzoo, whichever one is installed
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True,
                          env=environment)
    assert "rotograd 0.1.6.0" in done.stdout
    assert not (Path(mtlzoo_main.__code__.co_filename).parent / "bench_reference.py").exists()
    for option in ("--vs-reference", "--growth"):
        assert mtlzoo_main(["bench", option]) == 2
        assert "python benchmarks/vs_reference.py" in capsys.readouterr().err
