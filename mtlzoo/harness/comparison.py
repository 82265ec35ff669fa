"""Every strategy trained under the identical conditions of :mod:`mtlzoo.harness.training` on a problem
(:func:`compare`), into a :class:`~mtlzoo.harness.results.ComparisonResults`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from mtlzoo.errors import ComparisonError
from mtlzoo.harness.config import RunConfig
from mtlzoo.harness.plan import Plan, plan_all
from mtlzoo.harness.problems import Problem, create_problem, default_problems, get_problem
from mtlzoo.harness.results import ComparisonResults, RunResult
from mtlzoo.harness.spec import StrategySpec, parse_spec
from mtlzoo.harness.store import fingerprint, load_run, run_path, single_task_reference, write_json
from mtlzoo.harness.training import ProgressCallback, ProgressEvent, run


def compare(problem: Problem | str, strategies: Sequence[StrategySpec | str | Plan] | str | None = None,
            config: RunConfig | None = None, *, progress: ProgressCallback | None = None,
            **settings: Any) -> ComparisonResults:
    """Train every strategy on ``problem`` under identical conditions and collect the results.

    Args:
        problem: A :class:`~mtlzoo.harness.problems.Problem` or a registered problem name (with its default settings).
        strategies: Names or :class:`~mtlzoo.harness.spec.StrategySpec`\\ s (``"name:key=value"`` strings are parsed), a
            comma-separated string, ``"all"`` (every registered strategy) or ``None`` (the default set: ``ls`` and the
            strategies marked ``default_comparison``). ``ls`` is always added. Or the
            :class:`~mtlzoo.harness.plan.Plan`\\ s that :func:`~mtlzoo.harness.plan.plan_all` returned for this problem.
        config: Seeds, steps, reference, device, output folder (:class:`~mtlzoo.harness.config.RunConfig`).
        progress: Called with :class:`~mtlzoo.harness.training.ProgressEvent`\\ s.
        **settings: Fields of :class:`~mtlzoo.harness.config.RunConfig`, when ``config`` is not given
            (``compare("toy2d", ["upgrad"], seeds=2, steps=100)``).

    Raises (before any training):
        UnknownStrategyError, UnknownProblemError, UnknownHyperparameterError: Bad names (with close matches).
        ComparisonError: A strategy that cannot run on the problem (``strict``), a problem whose ``evaluate`` does not
            report its declared metrics, a setting out of range, or ``out`` already holding runs without ``resume``.
    """
    if config is not None and settings:
        raise TypeError(f"compare() takes either `config` or its fields as keywords, not both. Found "
                        f"{sorted(settings)}.")
    config = RunConfig(**settings) if config is None else config
    problem = create_problem(problem) if isinstance(problem, str) else problem
    if isinstance(strategies, Sequence) and not isinstance(strategies, str) and strategies \
            and all(isinstance(p, Plan) for p in strategies):
        plans: list[Plan] = list(strategies)  # type: ignore[arg-type]  # already checked by plan_all
    else:
        plans = plan_all(problem, strategies, reference=config.trained_reference, strict=config.strict,  # type: ignore[arg-type]
                         device=config.device)
    config.check_out([problem.name])
    external = None if config.reference_from is None else single_task_reference(config.reference_from, problem)
    seeds, steps = config.seeds_for(problem), config.steps_for(problem)
    report: ProgressCallback = progress or (lambda event: None)
    report(ProgressEvent("start", problem.name, total_runs=len(plans) * len(seeds), steps=steps))
    runs: list[RunResult] = []
    for seed in seeds:
        initial: nn.Module | None = None
        for plan_ in plans:
            path = run_path(config.out, problem.name, plan_.label, seed) if config.out is not None else None
            done = load_run(path, fingerprint(problem, plan_, seed, steps, config)) \
                if path is not None and config.resume else None
            skipped = done is not None
            if done is None:
                report(ProgressEvent("run_start", problem.name, plan_.label, seed, steps=steps))
                if initial is None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        initial = problem.build_model()
                done = run(problem, plan_, seed, config, initial_model=initial, progress=progress)
                if path is not None:
                    write_json(path, done.to_dict())
            runs.append(done)
            report(ProgressEvent("run_end", problem.name, plan_.label, seed, steps, steps, result=done,
                                 skipped=skipped))
    return ComparisonResults(problem, runs, [p.label for p in plans if p.role == "strategy"], config.reference,
                             steps=steps, seeds=seeds, external_reference=external)


def iter_problems(names: Iterable[str] | None, *, data: str | None = None) -> Iterator[Problem]:
    """Problems from ``"name"`` / ``"name:key=value"`` texts (default: the default problems); ``data`` is the
    ``data`` setting (``--data PATH``) of those that read a data set from disk.

    Raises:
        ComparisonError: ``data`` given, and no problem named reads a data set from disk.
    """
    texts = [parse_spec(text) for text in (default_problems() if names is None else names)]
    takes_data = [name for name, _ in texts if "data" in get_problem(name).settings]
    if data is not None and not takes_data:
        raise ComparisonError(f"--data: none of the problems {[name for name, _ in texts]} reads a data set from "
                              "disk (nyuv2, cityscapes, celeba and qm9 do).")
    for name, settings in texts:
        if data is not None and name in takes_data:
            settings = {"data": data, **settings}
        yield create_problem(name, **settings)
