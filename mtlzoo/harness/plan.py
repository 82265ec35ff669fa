"""A comparison checked before any training (:func:`plan_all`): the problem's metrics, and each strategy
against the problem (:class:`Plan`), so that a comparison that cannot run fails at once."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mtlzoo.errors import ComparisonError, MissingHyperparameterError
from mtlzoo.harness.config import Reference, check_device, check_reference
from mtlzoo.harness.problems.base import Problem, check_metrics, to_device
from mtlzoo.harness.spec import BASELINE, StrategySpec, default_strategies, optimizer_class, split_top_level
from mtlzoo.registry import REGISTRY, StrategyEntry, get_strategy, list_strategies, split_modifiers
from mtlzoo.roles.modifiers import MODIFIERS
from mtlzoo.strategy import REQUIRED, hyperparameters
from mtlzoo.wrapper import MTLWrapper


@dataclass
class Plan:
    """A strategy as checked against a problem, before training: what a run builds."""

    spec: StrategySpec
    entry: StrategyEntry
    label: str
    options: dict[str, Any]
    optimizer: tuple[str, float] | None
    role: str = "strategy"
    error: str | None = None
    """Set when the strategy cannot run on the problem (``strict=False`` records it as failed)."""

    @property
    def name(self) -> str:
        """The name the strategy is created by: the entry's name, inside the spec's modifiers if any."""
        return strategy_entry(self.spec.name)[1]

    @property
    def task(self) -> str | None:
        """The task of a single-task reference run (``"single_task[<task>]"``), else ``None``."""
        return self.label.split("[", 1)[1].rstrip("]") if self.role == "reference" else None


def strategy_entry(name: str) -> tuple[StrategyEntry, str, set[str]]:
    """The registry entry behind a (possibly modified) name, the name spelt with the entry's own name
    (``"ema(MGDA)"`` gives ``"ema(mgda)"``), and the hyperparameters its modifiers take.

    Raises:
        UnknownStrategyError: An unknown strategy or modifier.
    """
    modifiers, base = split_modifiers(name)
    entry = get_strategy(base)
    spelt, own = entry.name, set()
    for modifier in reversed(modifiers):
        if modifier not in MODIFIERS:
            REGISTRY.create(f"{modifier}({entry.name})", num_tasks=2)  # raises, suggesting a close modifier
        spelt = f"{modifier}({spelt})"
        own |= set(hyperparameters(MODIFIERS[modifier])) - {"inner"}
    return entry, spelt, own


def _optimizer_recipe(problem: Problem, spec: StrategySpec, entry: StrategyEntry) -> tuple[str | None, float | None]:
    """The run's, else the problem's, else the metadata's optimizer and learning rate of the strategy's parameters."""
    recipe = problem.strategy_optimizer(entry) or (None, None)
    kind = next((k for k in (spec.optimizer, recipe[0], entry.info.optimizer) if k is not None), None)
    lr = next((r for r in (spec.lr, recipe[1], entry.info.lr) if r is not None), None)
    if kind is not None:
        optimizer_class(kind)
    return kind, lr


def plan(problem: Problem, spec: StrategySpec | str, *, device: str | torch.device = "cpu") -> Plan:
    """Check that ``spec`` can run on ``problem`` and fix what a run builds: options and optimizer.

    The options: the problem's (:meth:`~mtlzoo.harness.problems.Problem.strategy_options`, by default
    the metadata's suggestions), then the spec's. Builds the strategy on the problem's model once,
    with one forward (which materialises lazily shaped strategies), leaving the global RNG as it was.

    Raises:
        UnknownStrategyError: An unknown name (the message lists close names).
        UnknownHyperparameterError: An option the strategy does not take (with a suggestion).
        ComparisonError: The strategy needs something the problem cannot give (a value for a required hyperparameter, an
            optimizer for its own parameters, a named backbone parameter); the message names the strategy.
    """
    spec = StrategySpec.parse(spec) if isinstance(spec, str) else spec
    entry, name, modifier_options = strategy_entry(spec.name)
    options = {**problem.strategy_options(entry), **dict(spec.options)}
    label = replace(spec, name=name).display()
    where = f"Strategy {label!r} cannot run on problem {problem.name!r}"
    unknown = {key: value for key, value in spec.options.items()
               if key not in entry.hyperparameters and key not in modifier_options}
    if unknown:
        REGISTRY.create(entry.name, num_tasks=problem.num_tasks, **unknown)  # raises, suggesting close names
    kind, lr = _optimizer_recipe(problem, spec, entry)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            strategy = REGISTRY.create(name, num_tasks=problem.num_tasks, **options)
        except MissingHyperparameterError as error:
            missing = [p for p, d in entry.hyperparameters.items() if d is REQUIRED and p not in options] or ["..."]
            raise ComparisonError(f"{where}: {error} Give it in the spec, e.g. '{entry.name}:{missing[0]}=...', or "
                                  f"suggest a value in its metadata: StrategyInfo(suggested={{...}}).") from error
        except (ValueError, TypeError) as error:
            raise ComparisonError(f"{where}: {type(error).__name__}: {error}") from error
        request = strategy.request
        try:
            mtl = MTLWrapper(problem.build_model(), strategy).to(device)
            x, _ = next(iter(problem.epoch(torch.Generator().manual_seed(0))))
            with torch.no_grad():
                mtl(to_device(x, torch.device(device)))
            own = [p for p in mtl.strategy_parameters() if p.requires_grad]
        except Exception as error:
            raise ComparisonError(f"{where}: building it on the problem's model failed: "
                                  f"{type(error).__name__}: {error}") from error
        if request.parameters is not None:
            names = dict(mtl.backbone.named_parameters())
            absent = [name for name in request.parameters if name not in names]
            if absent:
                raise ComparisonError(f"{where}: it reads the backbone parameters {absent}, which the problem's "
                                      f"backbone does not have (it has {list(names)}).")
    if own and (kind is None or lr is None):
        raise ComparisonError(
            f"{where}: it has {sum(p.numel() for p in own)} learnable parameters and no optimizer recipe for them "
            f"(its metadata gives optimizer={entry.info.optimizer!r}, lr={entry.info.lr!r}, and the problem none). "
            f"Set StrategyInfo(optimizer=..., lr=...), or give one: StrategySpec(..., optimizer='adam', lr=1e-3) "
            f"or --strategy-optimizer {entry.name}=adam:1e-3.")
    return Plan(spec, entry, label, options, (kind, float(lr)) if own else None)  # type: ignore[arg-type]


def check_problem(problem: Problem, device: str | torch.device = "cpu") -> None:
    """Check the problem's metrics on its untrained model (``ls``), before any training.

    Raises:
        ComparisonError: ``evaluate`` does not return the metrics the problem declares for each task
            (see :func:`~mtlzoo.harness.problems.base.check_metrics`), or fails.
    """
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtl = MTLWrapper(problem.build_model(), REGISTRY.create(BASELINE, num_tasks=problem.num_tasks)).to(device)
        mtl.eval()
        try:
            with torch.no_grad():
                reported = problem.evaluate(mtl, torch.device(device))
        except Exception as error:
            raise ComparisonError(f"Problem {problem.name!r}: evaluate() failed on the untrained model: "
                                  f"{type(error).__name__}: {error}") from error
    if not isinstance(reported, Mapping) or not all(isinstance(v, Mapping) for v in reported.values()):
        raise ComparisonError(f"Problem {problem.name!r}: evaluate() should return {{task: {{metric: value}}}}. "
                              f"Found {reported!r}.")
    check_metrics(problem, {task: dict(values) for task, values in reported.items()})


def resolve_specs(strategies: Sequence[StrategySpec | str] | str | None) -> tuple[list[StrategySpec], bool]:
    """The specs, and whether they were named (strict) rather than the default set or ``all``."""
    if strategies is None or strategies == "default":
        return default_strategies(), False
    if strategies == "all":
        return [StrategySpec(entry.name) for entry in list_strategies()], False
    if isinstance(strategies, str):
        strategies = split_top_level(strategies, ",")
    return [StrategySpec.parse(s) if isinstance(s, str) else s for s in strategies], True


def plan_all(problem: Problem, strategies: Sequence[StrategySpec | str] | str | None = None, *,
             reference: Reference = "ls", strict: bool | None = None, device: str | torch.device = "cpu") -> list[Plan]:
    """Check the problem's metrics and every strategy against ``problem`` before any training (see :func:`plan`).

    ``ls`` is always run. With ``strict`` (the default when strategies are named) a strategy that cannot
    run raises :class:`~mtlzoo.errors.ComparisonError`, otherwise it is recorded as failed with the
    reason. Unknown names and options always raise.
    """
    check_device(device)
    specs, named = resolve_specs(strategies)
    strict = named if strict is None else strict
    check_reference(reference)
    entries = [strategy_entry(spec.name)[0] for spec in specs]  # unknown names fail first, before any building
    check_problem(problem, device)
    if not any(entry.name == BASELINE and not split_modifiers(spec.name)[0] and not spec.options
               and spec.optimizer is None and spec.lr is None and spec.label in (None, BASELINE)
               for spec, entry in zip(specs, entries)):
        specs, entries = [StrategySpec(BASELINE), *specs], [get_strategy(BASELINE), *entries]
    plans: list[Plan] = []
    for spec, entry in zip(specs, entries):
        try:
            plans.append(plan(problem, spec, device=device))
        except ComparisonError as error:
            if strict:
                raise
            label = replace(spec, name=strategy_entry(spec.name)[1]).display()
            plans.append(Plan(spec, entry, label, dict(spec.options), None, error=str(error)))
    labels = [p.label for p in plans]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ComparisonError(f"Strategies {twice} are given twice with the same settings; give one a `label`.")
    for k, task in enumerate(problem.task_names if reference == "single_task" else []):
        weights = [float(j == k) for j in range(problem.num_tasks)]
        reference_spec = StrategySpec(BASELINE, {"weights": weights}, label=f"single_task[{task}]")
        plans.append(replace(plan(problem, reference_spec, device=device), role="reference"))
    return plans
