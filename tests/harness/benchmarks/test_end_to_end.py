"""Each benchmark end to end through ``mtlzoo compare`` at smoke scale on a generated miniature data set in its
on-disk format: ``ls`` and a surgery method (PCGrad; IMTL-G, on the representation, for CelebA's 40 tasks),
metrics computed and written per task and seed, Δm% against
the single-task runs with the papers' signs, a resumed comparison that trains nothing again, and a later comparison
that reads the single-task runs instead of training them.

The signs are those of the authors' ``delta_fn`` (Nash-MTL's ``utils.SIGN``: 1 where higher is better), written
here, not read from the problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlzoo.cli import main
from mtlzoo.harness import comparison
from tests.harness.benchmarks import datasets

HIGHER = {"miou": 1, "pixel_acc": 1, "abs_err": 0, "rel_err": 0, "mean_angle": 0, "median_angle": 0,
          "within_11.25": 1, "within_22.5": 1, "within_30": 1, "f1": 1, "mae": 0}
TERMS = {  # the metrics each paper's Δm% averages, per task
    "nyuv2": {"segmentation": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"],
              "normal": ["mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"]},
    "cityscapes": {"segmentation": ["miou", "pixel_acc"], "depth": ["abs_err", "rel_err"]},
}
CASES = {
    "nyuv2": (datasets.write_nyuv2, "batch_size=2", 3, "pcgrad"),
    "cityscapes": (datasets.write_cityscapes, "batch_size=2", 2, "pcgrad"),
    "celeba": (datasets.write_celeba, "batch_size=3", 40, "imtl_g"),
    "qm9": (datasets.write_qm9, "batch_size=4:test_size=6:val_size=6", 11, "pcgrad"),
}


def _delta_m(run: dict, references: dict[str, dict], terms: dict[str, list[str]]) -> float | None:
    values = []
    for task, names in terms.items():
        base = references[task]["metrics"][task]
        for name in names:
            if base[name] == 0:  # a single-task F1 of 0 on a few test images: no ratio, no Δm%
                return None
            sign = -1 if HIGHER[name] else 1
            values.append(sign * (run["metrics"][task][name] - base[name]) / base[name])
    return 100 * sum(values) / len(values)


@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_end_to_end_with_single_task_reference_and_resume(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    write, settings, tasks, surgery = CASES[name]
    data = write(tmp_path / "data")
    out = tmp_path / "out"
    command = ["compare", "--problem", f"{name}:scale=smoke:workers=0:{settings}", "--data", str(data),
               "--strategies", f"ls,{surgery}", "--reference", "single_task", "--out", str(out), "--no-plots",
               "--conflict-every", "0"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["problems"][0]
    runs = {run["label"]: run for run in results["runs"]}
    assert set(runs) == {"ls", surgery, *(f"single_task[{t}]" for t in results["task_names"])}
    assert len(results["task_names"]) == tasks
    for run in runs.values():  # every metric of every task, finite, for the one smoke seed
        assert run["status"] == "ok" and run["seed"] == 0 and run["steps_done"] == 3
        assert set(run["metrics"]) == set(results["task_names"])
        for task, names in results["task_metrics"].items():
            assert set(run["metrics"][task]) == set(names)
            assert all(isinstance(v, float) for v in run["metrics"][task].values())
        assert run["evaluations"]  # what the reported metrics summarise
    terms = TERMS.get(name) or {task: [results["task_metrics"][task][0]] for task in results["task_names"]}
    assert sorted(map(tuple, results["delta_m_terms"])) == sorted((t, n) for t, ns in terms.items() for n in ns)
    if name == "celeba":  # 40 tasks: the table shows the means over the attributes, the files every attribute
        assert {n for _, n in results["delta_m_terms"]} == {"f1"}
        assert "mean f1 (40 tasks)" in printed and "mean accuracy (40 tasks)" in printed
        row = {r["strategy"]: r for r in results["summary"]}["ls"]
        f1 = [runs["ls"]["metrics"][task]["f1"] for task in results["task_names"]]
        assert row["mean/f1"] == pytest.approx(sum(f1) / 40)
    references = {task: runs[f"single_task[{task}]"] for task in results["task_names"]}
    summary = {row["strategy"]: row for row in results["summary"]}
    for label in ("ls", surgery):
        expected = _delta_m(runs[label], references, terms)
        assert summary[label]["delta_m"] == (None if expected is None else pytest.approx(expected, rel=1e-9))
    if name != "celeba":
        assert summary["ls"]["delta_m"] is not None
    assert (out / "results.csv").read_text().count("\n") == len(runs) + 1

    # resumed: every run is read back, none trained again, the same results
    trained = []
    real_run = comparison.run
    monkeypatch.setattr(comparison, "run", lambda *a, **k: trained.append(a[1].label) or real_run(*a, **k))
    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    assert trained == []
    again = json.loads((out / "results.json").read_text())["problems"][0]
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in results["runs"]]

    # a later comparison measures Δm% against those single-task runs without training them
    later = tmp_path / "later"
    assert main([*command[:command.index("--reference")], "--reference-from", str(out), "--out", str(later),
                 "--no-plots", "--conflict-every", "0", "--strategies", "ls"]) == 0
    assert not any(label.startswith("single_task") for label in trained)
    reread = json.loads((later / "results.json").read_text())["problems"][0]
    assert reread["reference"] == "single_task"
    row = {r["strategy"]: r for r in reread["summary"]}["ls"]
    assert row["delta_m"] == (None if summary["ls"]["delta_m"] is None
                              else pytest.approx(summary["ls"]["delta_m"], rel=1e-9))  # same seed, same runs
