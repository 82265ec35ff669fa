"""The harness: problems, runs, comparisons, results, plots and the step-time benchmark.

The library (wrapper, strategies, engine, registry) never imports this package; the harness
uses the library only through its public surface, as a user would. One concept per module:

- :mod:`~mtlzoo.harness.spec`: what to run (:class:`StrategySpec`, parsed from ``"name:key=value"``);
- :mod:`~mtlzoo.harness.config`: how (:class:`RunConfig`: seeds, steps, reference, device, output);
- :mod:`~mtlzoo.harness.plan`: every strategy and the problem's metrics checked before training;
- :mod:`~mtlzoo.harness.training`: one strategy, one problem, one seed;
- :mod:`~mtlzoo.harness.comparison`: every strategy under identical conditions (:func:`compare`);
- :mod:`~mtlzoo.harness.results`: what the runs say (Δm%, ranks, summaries);
- :mod:`~mtlzoo.harness.store`: runs and results on disk (:func:`save`, :func:`load`, ``resume``);
- :mod:`~mtlzoo.harness.problems`: the problems and their registry;
- :mod:`~mtlzoo.harness.plots` (matplotlib) and :mod:`~mtlzoo.harness.bench` (``mtlzoo bench``).

Example:
    >>> from mtlzoo.harness import compare
    >>> results = compare("toy2d", ["upgrad"], seeds=1, steps=5, conflict_every=0)
    >>> [row["strategy"] for row in results.summary()]
    ['ls', 'upgrad']
"""

from mtlzoo.harness.comparison import compare, iter_problems
from mtlzoo.harness.config import RunConfig, check_device
from mtlzoo.harness.plan import Plan, check_problem, plan, plan_all
from mtlzoo.harness.problems import (
    Metric,
    Problem,
    create_problem,
    default_problems,
    get_problem,
    list_problems,
    register_problem,
)
from mtlzoo.harness.results import ComparisonResults, RunResult
from mtlzoo.harness.spec import BASELINE, StrategySpec, default_strategies, optimizer_class, parse_spec
from mtlzoo.harness.store import load, run_path, save
from mtlzoo.harness.training import ProgressEvent, measure_conflicts, run, train_and_evaluate

__all__ = ["BASELINE", "ComparisonResults", "Metric", "Plan", "Problem", "ProgressEvent", "RunConfig", "RunResult",
           "StrategySpec", "check_device", "check_problem", "compare", "create_problem", "default_problems",
           "default_strategies", "get_problem", "iter_problems", "list_problems", "load", "measure_conflicts",
           "optimizer_class", "parse_spec", "plan", "plan_all", "register_problem", "run", "run_path", "save",
           "train_and_evaluate"]
