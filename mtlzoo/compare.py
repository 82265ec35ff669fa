r"""The comparison harness: every strategy trained under identical conditions on a problem.

:func:`compare` trains each strategy on a :class:`~mtlzoo.problems.Problem`, seed by seed, with

- the same initial weights: one initialisation per seed (the problem's model built under
  ``torch.manual_seed(seed)``), copied for every strategy;
- the same data order: the batches of every epoch drawn from a ``torch.Generator`` seeded with the
  seed, so every strategy sees the same batches in the same order;
- the same model optimizer and learning rate (the problem's recipe);
- the strategy's own parameters (rotations, task weights) trained by their own optimizer: the type
  and learning rate in the strategy's metadata (``StrategyInfo.optimizer``, ``.lr``), which the
  problem's recipe may override (:meth:`~mtlzoo.problems.Problem.strategy_optimizer`) and a run
  may override again (:class:`StrategySpec`);

and the training loop of the step protocol::

    optimizer.zero_grad()
    with mtlzoo.cached():
        losses = problem.losses(mtl(x), y)
        mtl.backward(losses)
    mtl.step(*optimizers, post_step_losses=...)      # only for strategies that read them (FAMO)
    ...
    mtl.end_epoch()                                   # after each of the problem's epochs

It returns a :class:`ComparisonResults`: per strategy and seed each task's final test metrics,
the training-loss curves, Δm% against ``ls`` (or single-task training), the mean rank, the
seconds per step and their ratio to ``ls`` measured in the same comparison, and gradient-conflict
statistics; summaries give the mean and standard deviation over seeds.

**Δm%** (as Nash-MTL and FAMO report it; lower is better)::

    Δm% = (100 / K) sum_k (-1)^{h_k} (M_k - M_ref,k) / M_ref,k,     h_k = 1 when higher M_k is better

with ``M_ref`` the metrics of ``ls`` on the same seed (or, with ``reference="single_task"``, of
K single-task runs: ``ls`` weighted by the k-th unit vector, from the same initialisation), on the
problem's primary metric, for problems whose metrics are bounded away from zero.

**Gradient conflict.** Every ``conflict_every`` steps, in a measurement pass outside the timed
step, the harness computes each task's gradient of its raw loss with respect to the shared
representation ``z = backbone(x)``: before any strategy combines them (through the strategy's
per-task transform of ``z``, RotoGrad's rotation, when it has one). It records the pairwise
cosine similarities, and the share of measurements in which some pair conflicts (cosine < 0).

A strategy whose request reads several independent batches per step (SDMGrad, MoDo) gets the
additional ones from data streams of their own, seeded from the seed, and passes their losses as
``mtl.backward(losses, more_batches=[...])``: the batches the model learns from stay those of every
other strategy.

A strategy that raises, or whose losses or metrics stop being finite, is recorded as failed with
its error, and the comparison goes on. Warnings raised during a run are recorded with it.

Nothing here prints: the command ``mtlzoo compare`` (:mod:`mtlzoo.cli`) shows progress and tables.
"""

from __future__ import annotations

import ast
import copy
import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlzoo.caching import cached
from mtlzoo.errors import ComparisonError, MissingHyperparameterError
from mtlzoo.problems import Problem, create_problem, list_problems
from mtlzoo.problems.base import to_device
from mtlzoo.registry import REGISTRY, StrategyEntry, get_strategy, list_strategies
from mtlzoo.strategy import REQUIRED
from mtlzoo.wrapper import MTLWrapper

BASELINE = "ls"
RUNS_DIR = "runs"
FORMAT_VERSION = 1
PROGRESS_EVERY = 10
"""Steps between two ``step`` progress events."""
EXTRA_STREAM_SEED = 1_000_003
"""Seeds the data streams of the additional independent batches a request may read (``batches > 1``)."""

Reference = Literal["ls", "single_task"]


# =========================================================================== what to run
@dataclass(frozen=True)
class StrategySpec:
    """A strategy as one comparison runs it.

    Attributes:
        name: A registered strategy name or alias.
        options: Its hyperparameters for this run (over the problem's own, which they replace).
        optimizer: The ``torch.optim`` class name for its own parameters (over the problem's and the metadata's).
        lr: The learning rate of that optimizer (idem).
        label: The name the results use (default: the name, then the options given here).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    lr: float | None = None
    label: str | None = None

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        """``"name"`` or ``"name:key=value:key=value"`` (values are Python literals, else strings)."""
        name, options = parse_spec(text)
        return cls(name, options)

    def display(self) -> str:
        if self.label:
            return self.label
        text = self.name + "".join(f":{key}={_literal(value)}" for key, value in self.options.items())
        if self.optimizer is not None or self.lr is not None:
            text += f"@{self.optimizer or ''}{'' if self.lr is None else f':{self.lr:g}'}"
        return text


def _literal(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and quotes (``"a:w=[1,2],b"`` on "," gives two parts)."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal (``0.5``, ``[1, 2]``), ``true``/``false``/``none``, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value:..."`` into the name and its options."""
    name, *pairs = split_top_level(text, ":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ComparisonError(f"{text!r}: options are written name:key=value:key=value; {pair!r} has no '='.")
        options[key.strip()] = parse_value(value)
    return name.strip(), options


def default_strategies() -> list[StrategySpec]:
    """``ls`` and every registered strategy marked ``default_comparison`` in its metadata."""
    names = [entry.name for entry in list_strategies() if entry.info.default_comparison]
    return [StrategySpec(name) for name in ([BASELINE] + [n for n in names if n != BASELINE])]


def default_problems() -> list[str]:
    """The registered problems marked ``in_default`` whose optional extra (if any) is installed."""
    return [entry.name for entry in list_problems(available_only=True) if entry.cls.in_default]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name`` (case-insensitive: ``"adam"``, ``"SGD"``)."""
    classes = {key.lower(): value for key, value in vars(torch.optim).items()
               if isinstance(value, type) and issubclass(value, torch.optim.Optimizer)
               and value is not torch.optim.Optimizer}
    try:
        return classes[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(classes), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ComparisonError(f"Unknown optimizer {name!r}: it should name a torch.optim class.{hint}") from None


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


def plan(problem: Problem, spec: StrategySpec | str, *, device: str | torch.device = "cpu") -> Plan:
    """Check that ``spec`` can run on ``problem`` and fix what a run builds: options and optimizer.

    Builds the strategy on the problem's model once (and one forward, which materialises lazily
    shaped strategies), without touching the global RNG.

    Raises:
        UnknownStrategyError: An unknown name (the message lists close names).
        UnknownHyperparameterError: An option the strategy does not take (with a suggestion).
        ComparisonError: The strategy needs something the problem cannot give (a value for a
            required hyperparameter, an optimizer for its own parameters, a named backbone parameter);
            the message names the strategy.
    """
    spec = StrategySpec(spec) if isinstance(spec, str) else spec
    entry = get_strategy(spec.name)
    options = {**problem.strategy_options(entry), **dict(spec.options)}
    label = spec.label or StrategySpec(entry.name, spec.options, spec.optimizer, spec.lr).display()
    where = f"Strategy {label!r} cannot run on problem {problem.name!r}"
    unknown = {key: value for key, value in spec.options.items() if key not in entry.hyperparameters}
    if unknown:
        REGISTRY.create(entry.name, num_tasks=problem.num_tasks, **unknown)  # raises, suggesting close names
    kind = spec.optimizer
    lr = spec.lr
    recipe = problem.strategy_optimizer(entry)
    if recipe is not None:
        kind = kind if kind is not None else recipe[0]
        lr = lr if lr is not None else recipe[1]
    kind = kind if kind is not None else entry.info.optimizer
    lr = lr if lr is not None else entry.info.lr
    if kind is not None:
        optimizer_class(kind)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            strategy = REGISTRY.create(entry.name, num_tasks=problem.num_tasks, **options)
        except MissingHyperparameterError as error:
            raise ComparisonError(f"{where}: {error} Give it in the spec, e.g. "
                                  f"'{entry.name}:{next(iter(_missing(entry, options)))}=...'.") from error
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
            unknown = [name for name in request.parameters if name not in names]
            if unknown:
                raise ComparisonError(f"{where}: it reads the backbone parameters {unknown}, which the problem's "
                                      f"backbone does not have (it has {list(names)}).")
    if own and (kind is None or lr is None):
        raise ComparisonError(
            f"{where}: it has {sum(p.numel() for p in own)} learnable parameters and no optimizer recipe for them "
            f"(its metadata gives optimizer={entry.info.optimizer!r}, lr={entry.info.lr!r}, and the problem none). "
            f"Set StrategyInfo(optimizer=..., lr=...), or give one: StrategySpec(..., optimizer='adam', lr=1e-3) "
            f"or --strategy-optimizer {entry.name}=adam:1e-3.")
    return Plan(spec, entry, label, options, (kind, float(lr)) if own else None)  # type: ignore[arg-type]


def _missing(entry: StrategyEntry, options: Mapping[str, Any]) -> list[str]:
    return [p for p, d in entry.hyperparameters.items() if d is REQUIRED and p not in options] or ["..."]


# =========================================================================== one run
@dataclass
class RunResult:
    """One strategy trained on one problem from one seed.

    Attributes:
        problem: The problem's name; ``settings`` its settings.
        label: The strategy as the results name it; ``strategy`` its registered name; ``options``
            its hyperparameters; ``optimizer`` the (type, lr) of its own parameters, if any.
        seed: The seed (initialisation, data order, the strategy's own draws).
        role: ``"strategy"``, or ``"reference"`` for single-task reference runs (``task`` names it).
        status: ``"ok"`` or ``"failed"`` (``error`` says why; ``steps_done`` how far it got).
        metrics: ``{task: {metric: value}}`` on the test data after training.
        train_losses: Per step, the K training losses (raw, before any weighting).
        seconds_per_step: Median wall time of a training step (zero_grad, forward, backward, step);
            ``seconds_mean`` the mean, ``wall_seconds`` the whole run.
        conflicts: ``{"steps": [...], "cosines": [[cos of each task pair i < j], ...]}``.
        trace: What the problem records per step for plots (toy2d: each task's output point).
        warnings: The distinct warnings the run raised.
    """

    problem: str
    settings: dict[str, Any]
    label: str
    strategy: str
    options: dict[str, Any]
    optimizer: list[Any] | None
    seed: int
    steps: int
    role: str = "strategy"
    task: str | None = None
    status: str = "ok"
    error: str | None = None
    steps_done: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_losses: list[list[float]] = field(default_factory=list)
    seconds_per_step: float | None = None
    seconds_mean: float | None = None
    wall_seconds: float | None = None
    conflicts: dict[str, list[Any]] = field(default_factory=lambda: {"steps": [], "cosines": []})
    trace: list[Any] | None = None
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _fingerprint(problem: Problem, plan_: Plan, seed: int, steps: int, conflict_every: int,
                 device: torch.device) -> str:
    identity = {"format": FORMAT_VERSION, "problem": problem.name, "settings": _jsonable(problem.settings),
                "model": [problem.model_optimizer, problem.model_lr], "label": plan_.label,
                "strategy": plan_.entry.name, "options": _jsonable(plan_.options), "optimizer": plan_.optimizer,
                "role": plan_.role, "seed": seed, "steps": steps, "conflict_every": conflict_every,
                "device": device.type}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _predictions_from(mtl: MTLWrapper, z: Tensor) -> Any:
    heads = list(mtl.heads.values()) if isinstance(mtl.heads, nn.ModuleDict) else list(mtl.heads)
    predictions = [_first(mtl.strategy.predict(head, z, k)) for k, head in enumerate(heads)]
    if mtl.task_names is not None:
        return dict(zip(mtl.task_names, predictions))
    return predictions


def _as_list(losses: Any) -> list[Tensor]:
    return list(losses.values()) if isinstance(losses, Mapping) else list(losses)


def measure_conflicts(mtl: MTLWrapper, problem: Problem, x: Any, y: Any) -> Tensor:
    """The K x K cosine similarities of the task gradients ``dL_k/dz`` on the shared representation.

    Each ``L_k`` is the raw task loss, computed through the strategy's transform of ``z`` for task k
    (the identity but for the RotoGrad family) and task k's head; ``z`` is detached, so no parameter
    receives a gradient, and the global RNG is left as it was (dropout draws nothing visible).
    """
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), cached():
        z = _first(mtl.backbone(x)).detach().requires_grad_()
        losses = _as_list(problem.losses(_predictions_from(mtl, z), y))
        grads = []
        for loss in losses:
            (grad,) = torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)
            grads.append(torch.zeros_like(z) if grad is None else grad)
    matrix = torch.stack([g.reshape(-1) for g in grads]).double()
    norms = matrix.norm(dim=1)
    gram = matrix @ matrix.T
    return (gram / torch.outer(norms, norms).clamp_min(torch.finfo(torch.float64).tiny)).float()


@dataclass
class ProgressEvent:
    """What :func:`compare` reports as it goes (``kind``: ``"start"``, ``"run_start"``, ``"step"``, ``"run_end"``)."""

    kind: str
    problem: str
    label: str | None = None
    seed: int | None = None
    step: int = 0
    steps: int = 0
    total_runs: int = 0
    result: RunResult | None = None
    skipped: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def run(problem: Problem, spec: StrategySpec | str | Plan, seed: int, *, steps: int | None = None,
        conflict_every: int = 10, device: str | torch.device = "cpu", initial_model: nn.Module | None = None,
        progress: ProgressCallback | None = None, threads: int | None = 1) -> RunResult:
    """Train one strategy on ``problem`` from ``seed`` and evaluate it; never raises for a failing strategy.

    Args:
        problem: The problem.
        spec: The strategy (a name, a :class:`StrategySpec`, or a :class:`Plan` from :func:`plan`).
        seed: Seeds the initialisation (unless ``initial_model`` is given), the data order and the
            strategy's own random draws.
        steps: Optimizer steps (default: the problem's ``default_steps``).
        conflict_every: Steps between two gradient-conflict measurements (0: none).
        device: Where to train.
        initial_model: The initial model to copy (the same for every strategy of a seed).
        progress: Called with ``"step"`` events every few steps.
        threads: torch's CPU threads during the run (restored after); ``None`` keeps torch's setting.
            One is the fastest for the built-in problems' small models, and gives steadier timings on a
            busy machine.

    The global RNG state is left as it was. ``KeyboardInterrupt`` propagates.
    """
    device = torch.device(device)
    plan_ = spec if isinstance(spec, Plan) else plan(problem, spec, device=device)
    steps = problem.default_steps if steps is None else int(steps)
    result = RunResult(problem.name, _jsonable(problem.settings), plan_.label, plan_.entry.name,
                       _jsonable(plan_.options), None if plan_.optimizer is None else list(plan_.optimizer), seed,
                       steps, role=plan_.role, task=_task_of(plan_),
                       fingerprint=_fingerprint(problem, plan_, seed, steps, conflict_every, device))
    if plan_.error is not None:
        result.status, result.error = "failed", plan_.error
        return result
    devices = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None and threads != previous_threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _train(problem, plan_, seed, steps, conflict_every, device, initial_model, progress, result)
            except Exception as error:
                result.status = "failed"
                result.error = f"{type(error).__name__}: {error}"
            result.warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)
    result.wall_seconds = time.perf_counter() - started
    return result


def _task_of(plan_: Plan) -> str | None:
    return plan_.label.split("[", 1)[1].rstrip("]") if plan_.role == "reference" else None


def _train(problem: Problem, plan_: Plan, seed: int, steps: int, conflict_every: int, device: torch.device,
           initial_model: nn.Module | None, progress: ProgressCallback | None, result: RunResult) -> None:
    torch.manual_seed(seed)
    model = copy.deepcopy(initial_model) if initial_model is not None else problem.build_model()
    torch.manual_seed(seed)  # the strategy's own draws do not depend on how the model came to be
    strategy = REGISTRY.create(plan_.entry.name, num_tasks=problem.num_tasks, **plan_.options)
    mtl = MTLWrapper(model, strategy).to(device)
    mtl.train()
    order = torch.Generator().manual_seed(seed)
    sample, _ = next(iter(problem.epoch(torch.Generator().manual_seed(seed))))
    with torch.no_grad():
        mtl(to_device(sample, device))  # materialises lazily shaped strategies before the optimizers exist
    optimizers: list[torch.optim.Optimizer] = [
        optimizer_class(problem.model_optimizer)(mtl.model_parameters(), lr=problem.model_lr)]
    own = [p for p in mtl.strategy_parameters() if p.requires_grad]
    if own:
        assert plan_.optimizer is not None
        kind, lr = plan_.optimizer
        optimizers.append(optimizer_class(kind)(own, lr=lr))
    post_step = mtl.strategy.wants_post_step_losses
    # a strategy reading several independent batches per step gets them from streams of their own, so that
    # the main batches, what the model learns from, are those of every other strategy
    streams = [_endless(problem, torch.Generator().manual_seed(EXTRA_STREAM_SEED * (i + 1) + seed))
               for i in range(mtl.strategy.request.batches - 1)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses_log: list[Tensor] = []
    times: list[float] = []
    trace: list[Any] = []
    step = 0
    try:
        while step < steps:
            before = step
            for x, y in problem.epoch(order):
                if step >= steps:
                    break
                x, y = to_device(x, device), to_device(y, device)
                if conflict_every and step % conflict_every == 0:
                    cosines = measure_conflicts(mtl, problem, x, y)
                    upper = torch.triu_indices(len(cosines), len(cosines), offset=1)
                    result.conflicts["steps"].append(step)
                    result.conflicts["cosines"].append(cosines[upper[0], upper[1]].tolist())
                sync()
                start = time.perf_counter()
                for optimizer in optimizers:
                    optimizer.zero_grad()
                with cached():
                    predictions = mtl(x)
                    losses = problem.losses(predictions, y)
                    more = [problem.losses(mtl(xm), ym) for xm, ym in (to_device(next(s), device) for s in streams)]
                    mtl.backward(losses, more_batches=more)
                mtl.step(*optimizers, post_step_losses=(
                    (lambda x=x, y=y: problem.losses(mtl(x), y)) if post_step else None))
                sync()
                times.append(time.perf_counter() - start)
                losses_log.append(torch.stack([loss.detach().float().reshape(()) for loss in _as_list(losses)]))
                traced = problem.trace(predictions)
                if traced is not None:
                    trace.append(traced)
                step += 1
                result.steps_done = step
                if progress is not None and (step % PROGRESS_EVERY == 0 or step == steps):
                    progress(ProgressEvent("step", problem.name, plan_.label, seed, step, steps))
            else:
                if step == before:
                    raise ComparisonError(f"Problem {problem.name!r} yielded an epoch without batches.")
                mtl.end_epoch()
                continue
            break
    finally:  # a failed run keeps its curves up to the failure
        result.train_losses = torch.stack(losses_log).tolist() if losses_log else []
        result.trace = trace or None
        result.seconds_per_step = statistics.median(times) if times else None
        result.seconds_mean = statistics.fmean(times) if times else None
    mtl.eval()
    with torch.no_grad():
        metrics = problem.evaluate(mtl, device)
    result.metrics = {task: {name: float(value) for name, value in values.items()} for task, values in metrics.items()}
    bad = [f"{task}/{name}" for task, values in result.metrics.items() for name, value in values.items()
           if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"diverged: non-finite test metrics {bad}")


def _endless(problem: Problem, generator: torch.Generator) -> Iterator[Any]:
    while True:
        yield from problem.epoch(generator)


# ====================================================================== the comparison
def _specs(strategies: Sequence[StrategySpec | str] | str | None) -> tuple[list[StrategySpec], bool]:
    """The specs, and whether they were named (strict) rather than the default set or ``all``."""
    if strategies is None or strategies == "default":
        return default_strategies(), False
    if strategies == "all":
        return [StrategySpec(entry.name) for entry in list_strategies()], False
    if isinstance(strategies, str):
        strategies = split_top_level(strategies, ",")
    return [StrategySpec.parse(s) if isinstance(s, str) else s for s in strategies], True


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, after allocating on it once.

    Raises:
        ComparisonError: torch cannot use it (``"cuda"`` without a GPU, a misspelled name).
    """
    try:
        device = torch.device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ComparisonError(f"Device {str(device)!r} cannot be used here: {error}") from None
    return device


def plan_all(problem: Problem, strategies: Sequence[StrategySpec | str] | str | None = None, *,
             reference: Reference = "ls", strict: bool | None = None,
             device: str | torch.device = "cpu") -> list[Plan]:
    """Check every strategy against ``problem`` before any training (see :func:`plan`).

    ``ls`` is always run (Δm% and time ratios are measured against it). With ``strict`` (the
    default when strategies are named), a strategy that cannot run raises
    :class:`~mtlzoo.errors.ComparisonError`; otherwise (the default set, ``"all"``) it is recorded
    as failed with the reason. Unknown names and options always raise.
    """
    check_device(device)
    specs, named = _specs(strategies)
    strict = named if strict is None else strict
    if reference not in ("ls", "single_task"):
        raise ComparisonError(f"Parameter `reference` should be 'ls' or 'single_task'. Found {reference!r}.")
    entries = [get_strategy(spec.name) for spec in specs]  # unknown names fail first, before any building
    if not any(entry.name == BASELINE and not spec.options and spec.optimizer is None and spec.lr is None
               and spec.label in (None, BASELINE) for spec, entry in zip(specs, entries)):
        specs = [StrategySpec(BASELINE), *specs]
    plans: list[Plan] = []
    for spec in specs:
        try:
            plans.append(plan(problem, spec, device=device))
        except ComparisonError as error:
            if strict:
                raise
            entry = get_strategy(spec.name)
            label = spec.label or StrategySpec(entry.name, spec.options, spec.optimizer, spec.lr).display()
            plans.append(Plan(spec, entry, label, dict(spec.options), None, error=str(error)))
    labels = [p.label for p in plans]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ComparisonError(f"Strategies {twice} are given twice with the same settings; give one a `label`.")
    if reference == "single_task":
        for k, task in enumerate(problem.task_names):
            weights = [float(j == k) for j in range(problem.num_tasks)]
            spec = StrategySpec(BASELINE, {"weights": weights}, label=f"single_task[{task}]")
            reference_plan = plan(problem, spec, device=device)
            reference_plan.role = "reference"
            plans.append(reference_plan)
    return plans


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:120] or "run"


def run_path(out: str | Path, problem: str, label: str, seed: int) -> Path:
    """Where :func:`compare` writes the finished run (``out/runs/<problem>/<label>__seed<seed>.json``)."""
    return Path(out) / RUNS_DIR / _slug(problem) / f"{_slug(label)}__seed{seed}.json"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (strict JSON; a diverged run's last losses)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(_finite(data), allow_nan=False))
    os.replace(temporary, path)  # a crash leaves the previous file or none, never half of one


def _load_run(path: Path, fingerprint: str) -> RunResult | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fingerprint:
        return None
    return RunResult.from_dict(data)


def compare(problem: Problem | str, strategies: Sequence[StrategySpec | str] | str | None = None, *,
            seeds: int | Iterable[int] | None = None, steps: int | None = None, reference: Reference = "ls",
            conflict_every: int = 10, device: str | torch.device = "cpu", out: str | Path | None = None,
            resume: bool = False, strict: bool | None = None, progress: ProgressCallback | None = None,
            threads: int | None = 1) -> ComparisonResults:
    """Train every strategy on ``problem`` under identical conditions and collect the results.

    Args:
        problem: A :class:`~mtlzoo.problems.Problem` or a registered problem name (with its default settings).
        strategies: Names or :class:`StrategySpec`\\ s (``"name:key=value"`` strings are parsed), a
            comma-separated string, ``"all"`` (every registered strategy) or ``None`` (the default set:
            ``ls`` and the strategies marked ``default_comparison``). ``ls`` is always added. Or the
            :class:`Plan`\\ s that :func:`plan_all` returned for this problem.
        seeds: A number of seeds (``0 .. n-1``) or the seeds themselves (default: the problem's ``default_seeds``).
        steps: Optimizer steps per run (default: the problem's ``default_steps``).
        reference: What Δm% is measured against: ``"ls"``, or ``"single_task"`` (K more runs per seed).
        conflict_every: Steps between two gradient-conflict measurements (0 disables them).
        device: Where to train.
        out: A folder: each finished run is written there as it ends (``runs/<problem>/...json``).
        resume: Reuse the runs already in ``out`` that were made with the same settings.
        strict: Raise (rather than record as failed) for a strategy that cannot run on the problem;
            default: when strategies are named.
        progress: Called with :class:`ProgressEvent`\\ s.
        threads: torch's CPU threads during the runs (see :func:`run`); ``None`` keeps torch's setting.

    Raises (before any training):
        UnknownStrategyError, UnknownProblemError, UnknownHyperparameterError: Bad names (with close matches).
        ComparisonError: A strategy that cannot run on the problem (``strict``), or ``out`` already
            holding runs without ``resume``.
    """
    problem = create_problem(problem) if isinstance(problem, str) else problem
    if isinstance(strategies, Sequence) and not isinstance(strategies, str) and strategies \
            and all(isinstance(p, Plan) for p in strategies):
        plans = list(strategies)  # type: ignore[arg-type]  # already checked by plan_all
    else:
        plans = plan_all(problem, strategies, reference=reference, strict=strict, device=device)
    seeds = problem.default_seeds if seeds is None else seeds
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(seed) for seed in seeds]
    steps = problem.default_steps if steps is None else int(steps)
    if steps < 1 or not seed_list:
        raise ComparisonError(f"A comparison needs at least one step and one seed. Found steps={steps}, "
                              f"seeds={seed_list}.")
    device = torch.device(device)
    if out is not None and not resume and (Path(out) / RUNS_DIR / _slug(problem.name)).exists():
        raise ComparisonError(f"{Path(out) / RUNS_DIR / _slug(problem.name)} already holds runs: pass resume=True "
                              "(--resume) to keep the finished ones and run the rest, or choose another folder.")
    total = len(plans) * len(seed_list)
    if progress is not None:
        progress(ProgressEvent("start", problem.name, total_runs=total, steps=steps))
    runs: list[RunResult] = []
    for seed in seed_list:
        initial: nn.Module | None = None
        for plan_ in plans:
            fingerprint = _fingerprint(problem, plan_, seed, steps, conflict_every, device)
            path = run_path(out, problem.name, plan_.label, seed) if out is not None else None
            done = _load_run(path, fingerprint) if path is not None and resume else None
            if done is None:
                if progress is not None:
                    progress(ProgressEvent("run_start", problem.name, plan_.label, seed, steps=steps))
                if initial is None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        initial = problem.build_model()
                done = run(problem, plan_, seed, steps=steps, conflict_every=conflict_every, device=device,
                           initial_model=initial, progress=progress, threads=threads)
                if path is not None:
                    _write_json(path, done.to_dict())
                skipped = False
            else:
                skipped = True
            runs.append(done)
            if progress is not None:
                progress(ProgressEvent("run_end", problem.name, plan_.label, seed, steps, steps, result=done,
                                       skipped=skipped))
    return ComparisonResults(problem, runs, [p.label for p in plans if p.role == "strategy"], reference,
                             steps=steps, seeds=seed_list)


# ========================================================================== the results
def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ranks(values: Mapping[str, float], higher_is_better: bool) -> dict[str, float]:
    """Rank 1 for the best; ties share the mean of their ranks."""
    ordered = sorted(values, key=lambda k: -values[k] if higher_is_better else values[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and values[ordered[j + 1]] == values[ordered[i]]:
            j += 1
        for k in ordered[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


class ComparisonResults:
    """The runs of one comparison on one problem, and what they say.

    Attributes:
        problem: The problem's name; ``settings``, ``task_names``, ``metrics`` (dicts with
            ``name``, ``higher_is_better``) and ``delta_m`` (whether Δm% applies) describe it.
        runs: Every :class:`RunResult` (strategies and reference runs).
        labels: The strategies, in order (``ls`` first).
        reference: ``"ls"`` or ``"single_task"``.

    :meth:`summary` has one row per strategy (means and standard deviations over seeds);
    :meth:`to_records` one flat row per run (``pandas.DataFrame(results.to_records())``).
    """

    def __init__(self, problem: Problem | Mapping[str, Any], runs: list[RunResult], labels: list[str],
                 reference: Reference = "ls", *, steps: int = 0, seeds: Sequence[int] = ()) -> None:
        if isinstance(problem, Problem):
            problem = {"name": problem.name, "settings": _jsonable(problem.settings),
                       "task_names": problem.task_names, "delta_m": problem.delta_m,
                       "metrics": [{"name": m.name, "higher_is_better": m.higher_is_better,
                                    "description": m.description} for m in problem.metrics]}
        self.problem: str = problem["name"]
        self.settings: dict[str, Any] = dict(problem["settings"])
        self.task_names: list[str] = list(problem["task_names"])
        self.delta_m: bool = bool(problem["delta_m"])
        self.metrics: list[dict[str, Any]] = [dict(m) for m in problem["metrics"]]
        self.runs = runs
        self.labels = labels
        self.reference = reference
        self.steps = steps
        self.seeds = list(seeds)

    # ------------------------------------------------------------------ access
    @property
    def primary(self) -> dict[str, Any]:
        return self.metrics[0]

    def runs_of(self, label: str) -> list[RunResult]:
        return [r for r in self.runs if r.label == label and r.role == "strategy"]

    def run(self, label: str, seed: int) -> RunResult | None:
        return next((r for r in self.runs if r.label == label and r.seed == seed), None)

    def failures(self) -> list[RunResult]:
        return [r for r in self.runs if not r.ok]

    # ------------------------------------------------------------ derived values
    def _reference_metrics(self, seed: int) -> dict[str, float] | None:
        name = self.primary["name"]
        if self.reference == "single_task":
            values = {}
            for task in self.task_names:
                ref = self.run(f"single_task[{task}]", seed)
                if ref is None or not ref.ok:
                    return None
                values[task] = ref.metrics[task][name]
            return values
        ref = self.run(BASELINE, seed)
        if ref is None or not ref.ok:
            return None
        return {task: ref.metrics[task][name] for task in self.task_names}

    def delta_m_of(self, result: RunResult) -> float | None:
        """Δm% of a run against the reference of its seed (``None`` where it does not apply)."""
        if not self.delta_m or not result.ok:
            return None
        reference = self._reference_metrics(result.seed)
        if reference is None:
            return None
        sign = -1.0 if self.primary["higher_is_better"] else 1.0
        name = self.primary["name"]
        terms = [sign * (result.metrics[t][name] - reference[t]) / reference[t] for t in self.task_names
                 if reference[t] != 0]
        return 100.0 * sum(terms) / len(self.task_names) if len(terms) == len(self.task_names) else None

    def mean_ranks(self, seed: int) -> dict[str, float]:
        """Per strategy that finished seed ``seed``: its rank on each task's primary metric, averaged over tasks."""
        name, higher = self.primary["name"], self.primary["higher_is_better"]
        finished = {r.label: r for r in self.runs if r.seed == seed and r.role == "strategy" and r.ok}
        totals = dict.fromkeys(finished, 0.0)
        for task in self.task_names:
            for label, rank in _ranks({lb: r.metrics[task][name] for lb, r in finished.items()}, higher).items():
                totals[label] += rank / len(self.task_names)
        return totals

    def time_ratio_of(self, result: RunResult) -> float | None:
        """Seconds per step of a run over those of ``ls`` on the same seed."""
        base = self.run(BASELINE, result.seed)
        if base is None or not result.ok or not base.ok or not base.seconds_per_step or result.seconds_per_step is None:
            return None
        return result.seconds_per_step / base.seconds_per_step

    def worst_of(self, result: RunResult) -> float | None:
        """The worst task's primary metric (the largest loss, the lowest accuracy)."""
        if not result.ok:
            return None
        values = [result.metrics[t][self.primary["name"]] for t in self.task_names]
        return min(values) if self.primary["higher_is_better"] else max(values)

    @staticmethod
    def conflict_share(result: RunResult) -> float | None:
        """The share of measurements in which some pair of task gradients conflicts (cosine < 0)."""
        cosines = result.conflicts.get("cosines") or []
        if not cosines:
            return None
        return sum(1.0 for pairs in cosines if pairs and min(pairs) < 0) / len(cosines)

    @staticmethod
    def mean_cosine(result: RunResult) -> float | None:
        values = [c for pairs in (result.conflicts.get("cosines") or []) for c in pairs]
        return statistics.fmean(values) if values else None

    # ------------------------------------------------------------------ tables
    def summary(self) -> list[dict[str, Any]]:
        """One row per strategy: means and standard deviations over its finished seeds.

        Keys: ``strategy``, ``ok`` / ``runs``, ``error`` (the first failure's), for each task and metric
        ``<task>/<metric>`` and ``<task>/<metric>_std``, ``worst`` (worst task's primary metric),
        ``delta_m``, ``rank``, ``seconds_per_step``, ``time_ratio``, ``conflict_share``,
        ``mean_cosine`` (each with ``_std``).
        """
        ranks = {seed: self.mean_ranks(seed) for seed in self.seeds or sorted({r.seed for r in self.runs})}
        rows = []
        for label in self.labels:
            runs = self.runs_of(label)
            finished = [r for r in runs if r.ok]
            row: dict[str, Any] = {"strategy": label, "ok": len(finished), "runs": len(runs),
                                   "error": next((r.error for r in runs if not r.ok), None)}
            for task in self.task_names:
                for metric in self.metrics:
                    key = f"{task}/{metric['name']}"
                    row[key], row[key + "_std"] = _mean_std([r.metrics[task][metric["name"]] for r in finished])
            columns: dict[str, list[float | None]] = {
                "worst": [self.worst_of(r) for r in finished],
                "delta_m": [self.delta_m_of(r) for r in finished],
                "rank": [ranks.get(r.seed, {}).get(label) for r in finished],
                "seconds_per_step": [r.seconds_per_step for r in finished],
                "time_ratio": [self.time_ratio_of(r) for r in finished],
                "conflict_share": [self.conflict_share(r) for r in finished],
                "mean_cosine": [self.mean_cosine(r) for r in finished],
            }
            for key, values in columns.items():
                row[key], row[key + "_std"] = _mean_std([v for v in values if v is not None])
            rows.append(row)
        return rows

    def to_records(self) -> list[dict[str, Any]]:
        """One flat row per run (pandas-friendly): ids, status, each ``<task>/<metric>``, derived values."""
        ranks = {seed: self.mean_ranks(seed) for seed in sorted({r.seed for r in self.runs})}
        records = []
        for r in self.runs:
            record: dict[str, Any] = {"problem": self.problem, "strategy": r.label, "name": r.strategy,
                                      "role": r.role, "seed": r.seed, "status": r.status, "error": r.error,
                                      "steps": r.steps, "steps_done": r.steps_done}
            for task in self.task_names:
                for metric in self.metrics:
                    record[f"{task}/{metric['name']}"] = r.metrics.get(task, {}).get(metric["name"])
            record.update({
                "worst": self.worst_of(r), "delta_m": self.delta_m_of(r),
                "rank": ranks.get(r.seed, {}).get(r.label) if r.role == "strategy" else None,
                "seconds_per_step": r.seconds_per_step, "time_ratio": self.time_ratio_of(r),
                "conflict_share": self.conflict_share(r), "mean_cosine": self.mean_cosine(r),
                "final_train_losses": r.train_losses[-1] if r.train_losses else None,
            })
            records.append(record)
        return records

    def to_dataframe(self) -> Any:
        """:meth:`to_records` as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas

        return pandas.DataFrame(self.to_records())

    # ------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "problem": self.problem, "settings": self.settings,
                "task_names": self.task_names, "delta_m": self.delta_m, "metrics": self.metrics,
                "labels": self.labels, "reference": self.reference, "steps": self.steps, "seeds": self.seeds,
                "summary": self.summary(), "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonResults:
        problem = {"name": data["problem"], "settings": data["settings"], "task_names": data["task_names"],
                   "delta_m": data["delta_m"], "metrics": data["metrics"]}
        return cls(problem, [RunResult.from_dict(r) for r in data["runs"]], list(data["labels"]),
                   data.get("reference", "ls"), steps=data.get("steps", 0), seeds=data.get("seeds", ()))


def save(results: Sequence[ComparisonResults], out: str | Path) -> list[Path]:
    """Write ``results.json`` (everything) and ``results.csv`` (one row per run) into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "results.json", folder / "results.csv"
    _write_json(json_path, {"format": FORMAT_VERSION, "problems": [r.to_dict() for r in results]})
    records = [_finite(record) for r in results for record in r.to_records()]
    columns = list(dict.fromkeys(key for record in records for key in record))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow({key: json.dumps(value) if isinstance(value, (list, dict)) else value
                         for key, value in record.items()})
    csv_path.write_text(buffer.getvalue())
    return [json_path, csv_path]


def load(path: str | Path) -> list[ComparisonResults]:
    """Read back what :func:`save` wrote (``results.json``, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text())
    return [ComparisonResults.from_dict(problem) for problem in data["problems"]]


def iter_problems(names: Iterable[str] | None) -> Iterator[Problem]:
    """Problems from ``"name"`` / ``"name:key=value"`` texts (default: :func:`default_problems`)."""
    for text in (default_problems() if names is None else names):
        name, settings = parse_spec(text)
        yield create_problem(name, **settings)
