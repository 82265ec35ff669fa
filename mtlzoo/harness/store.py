"""A comparison on disk: one JSON file per finished run (for ``resume``), and ``results.json`` / ``results.csv``,
written atomically (a crash leaves the previous file or none) as strict JSON (NaN and infinities as ``null``)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlzoo.errors import ComparisonError
from mtlzoo.harness.config import RUNS_DIR, RunConfig, slug
from mtlzoo.harness.results import FORMAT_VERSION, ComparisonResults, RunResult, jsonable

if TYPE_CHECKING:
    from mtlzoo.harness.plan import Plan
    from mtlzoo.harness.problems.base import Problem


def fingerprint(problem: Problem, plan: Plan, seed: int, steps: int, config: RunConfig) -> str:
    """A hash of everything that makes a run what it is (a resumed comparison reuses a run only if it matches)."""
    identity = {"format": FORMAT_VERSION, "problem": problem.name, "settings": jsonable(problem.settings),
                "model": [problem.model_optimizer, problem.model_lr], "label": plan.label,
                "strategy": plan.name, "options": jsonable(plan.options), "optimizer": plan.optimizer,
                "role": plan.role, "seed": seed, "steps": steps, "conflict_every": config.conflict_every,
                "device": config.torch_device.type}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_path(out: str | Path, problem: str, label: str, seed: int) -> Path:
    """Where a finished run is written (``out/runs/<problem>/<label>__seed<seed>.json``)."""
    return Path(out) / RUNS_DIR / slug(problem) / f"{slug(label)}__seed{seed}.json"


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (strict JSON; a diverged run's last losses)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict JSON to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(finite(data), allow_nan=False))
    os.replace(temporary, path)


def load_run(path: Path, expected: str) -> RunResult | None:
    """The run stored at ``path`` if its fingerprint is ``expected`` (else, or if unreadable, ``None``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return RunResult.from_dict(data) if data.get("fingerprint") == expected else None


def single_task_reference(out: str | Path, problem: Problem) -> dict[str, dict[str, float]]:
    """The single-task metrics of an earlier comparison in ``out`` on ``problem``: per task, each metric's mean
    over the seeds of its finished single-task run (``runs/<problem>/single_task_<task>__seed<n>.json``).

    Raises:
        ComparisonError: A task without a finished single-task run there, or runs made with other settings
            (the message says which and how to make them).
    """
    folder = Path(out) / RUNS_DIR / slug(problem.name)
    found: dict[str, list[RunResult]] = {task: [] for task in problem.task_names}
    for path in sorted(folder.glob("single_task*__seed*.json")):
        try:
            run = RunResult.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if run.role == "reference" and run.ok and run.task in found:
            found[run.task].append(run)
    missing = [task for task, runs in found.items() if not runs]
    if missing:
        raise ComparisonError(
            f"{folder} holds no finished single-task run of {problem.name!r} for the tasks {missing}: make them with "
            f"`mtlzoo compare --problem {problem.name} --reference single_task --out {out}`.")
    settings = jsonable(problem.settings)
    differing = sorted({key for runs in found.values() for run in runs for key, value in run.settings.items()
                        if key not in ("data", "workers") and settings.get(key) != value})
    if differing:
        raise ComparisonError(f"The single-task runs in {folder} were made with other settings of "
                              f"{problem.name!r} ({', '.join(differing)}): make them with this comparison's settings.")
    return {task: {name: math.fsum(run.metrics[task][name] for run in runs) / len(runs)
                   for name in runs[0].metrics[task]} for task, runs in found.items()}


def save(results: Sequence[ComparisonResults], out: str | Path) -> list[Path]:
    """Write ``results.json`` (everything) and ``results.csv`` (one row per run) into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "results.json", folder / "results.csv"
    write_json(json_path, {"format": FORMAT_VERSION, "problems": [r.to_dict() for r in results]})
    records = [finite(record) for r in results for record in r.to_records()]
    columns = list(dict.fromkeys(key for record in records for key in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({key: json.dumps(value) if isinstance(value, (list, dict)) else value
                      for key, value in record.items()} for record in records)
    csv_path.write_text(buffer.getvalue())
    return [json_path, csv_path]


def load(path: str | Path) -> list[ComparisonResults]:
    """Read back what :func:`save` wrote, also in earlier versions (``results.json``, or the folder holding it)."""
    path = Path(path)
    data = json.loads((path / "results.json" if path.is_dir() else path).read_text())
    return [ComparisonResults.from_dict(problem) for problem in data["problems"]]
