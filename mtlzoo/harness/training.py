"""One strategy trained on one problem from one seed (:func:`run`), under the harness's conditions.

Every strategy of a seed starts from the same weights (the problem's model built under ``torch.manual_seed(seed)``,
copied), sees the same batches in the same order (drawn from a ``torch.Generator`` seeded with the seed) and trains the
model with the problem's optimizer and learning rate; its own parameters (rotations, task weights) get their own
optimizer (:func:`~mtlzoo.harness.plan.plan`). The loop is the step protocol's::

    optimizer.zero_grad()
    with mtlzoo.cached():
        losses = problem.losses(mtl(x), y)
        mtl.backward(losses)
    mtl.step(*optimizers, post_step_losses=...)      # only for strategies that read them (FAMO)
    mtl.end_epoch()                                   # after each of the problem's epochs

Every ``conflict_every`` steps, outside the timed step, :func:`measure_conflicts` measures the gradient conflict. A
request that reads several independent batches per step (SDMGrad, MoDo) gets the extra ones from data streams of their
own, seeded from the seed: the batches the model learns from stay those of every other strategy. A strategy that raises,
or whose losses or metrics stop being finite, is recorded as failed with its error; its warnings are recorded with it.
Nothing here prints.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.caching import cached
from mtlzoo.errors import ComparisonError
from mtlzoo.harness.config import RunConfig
from mtlzoo.harness.plan import Plan, plan
from mtlzoo.harness.problems.base import Problem, to_device
from mtlzoo.harness.results import RunResult, jsonable
from mtlzoo.harness.spec import StrategySpec, optimizer_class
from mtlzoo.harness.store import fingerprint
from mtlzoo.registry import REGISTRY
from mtlzoo.wrapper import MTLWrapper

PROGRESS_EVERY = 10
"""Steps between two ``step`` progress events."""
EXTRA_STREAM_SEED = 1_000_003
"""Seeds the data streams of the additional independent batches a request may read (``batches > 1``)."""


@dataclass
class ProgressEvent:
    """What a comparison reports as it goes (``kind``: ``"start"``, ``"run_start"``, ``"step"``, ``"run_end"``)."""

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


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _predictions_from(mtl: MTLWrapper, z: Tensor) -> Any:
    heads = list(mtl.heads.values()) if isinstance(mtl.heads, nn.ModuleDict) else list(mtl.heads)
    predictions = [_first(mtl.strategy.predict(head, z, k)) for k, head in enumerate(heads)]
    return predictions if mtl.task_names is None else dict(zip(mtl.task_names, predictions))


def _as_list(losses: Any) -> list[Tensor]:
    return list(losses.values()) if isinstance(losses, Mapping) else list(losses)


def measure_conflicts(mtl: MTLWrapper, problem: Problem, x: Any, y: Any) -> Tensor:
    """The K x K cosine similarities of the task gradients ``dL_k/dz`` on the shared representation.

    ``L_k`` is task k's raw loss through the strategy's transform of ``z`` (the identity but for the
    RotoGrad family) and its head. No parameter receives a gradient; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), cached():
        z = _first(mtl.backbone(x)).detach().requires_grad_()
        losses = _as_list(problem.losses(_predictions_from(mtl, z), y))
        grads = [torch.autograd.grad(loss, z, retain_graph=True, allow_unused=True)[0] for loss in losses]
    matrix = torch.stack([(torch.zeros_like(z) if g is None else g).reshape(-1) for g in grads]).double()
    norms = matrix.norm(dim=1)
    gram = matrix @ matrix.T
    return (gram / torch.outer(norms, norms).clamp_min(torch.finfo(torch.float64).tiny)).float()


def run(problem: Problem, spec: StrategySpec | str | Plan, seed: int, config: RunConfig | None = None, *,
        initial_model: nn.Module | None = None, progress: ProgressCallback | None = None) -> RunResult:
    """Train one strategy on ``problem`` from ``seed`` and evaluate it; never raises for a failing strategy.

    Args:
        problem: The problem.
        spec: The strategy (a name, a :class:`~mtlzoo.harness.spec.StrategySpec`, or a
            :class:`~mtlzoo.harness.plan.Plan` from :func:`~mtlzoo.harness.plan.plan`).
        seed: Seeds the initialisation (unless ``initial_model`` is given), the data order and the
            strategy's own random draws.
        config: Steps, conflict measurements, device and threads (:class:`~mtlzoo.harness.config.RunConfig`).
        initial_model: The initial model to copy (the same for every strategy of a seed).
        progress: Called with ``"step"`` events every few steps.

    The global RNG state is left as it was. ``KeyboardInterrupt`` propagates.
    """
    config = RunConfig() if config is None else config
    device = config.torch_device
    plan_ = spec if isinstance(spec, Plan) else plan(problem, spec, device=device)
    steps = config.steps_for(problem)
    result = RunResult(problem.name, jsonable(problem.settings), plan_.label, plan_.name, jsonable(plan_.options),
                       None if plan_.optimizer is None else list(plan_.optimizer), seed, steps, role=plan_.role,
                       task=plan_.task, fingerprint=fingerprint(problem, plan_, seed, steps, config))
    if plan_.error is not None:
        result.status, result.error = "failed", plan_.error
        return result
    devices = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if config.threads is not None and config.threads != previous_threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _train(problem, plan_, seed, steps, config, initial_model, progress, result)
            except Exception as error:
                result.status, result.error = "failed", f"{type(error).__name__}: {error}"
            result.warnings = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)
    result.wall_seconds = time.perf_counter() - started
    return result


def _optimizers(mtl: MTLWrapper, problem: Problem, plan_: Plan) -> list[torch.optim.Optimizer]:
    optimizers = [optimizer_class(problem.model_optimizer)(mtl.model_parameters(), lr=problem.model_lr)]
    own = [p for p in mtl.strategy_parameters() if p.requires_grad]
    if own:
        assert plan_.optimizer is not None, "plan() gives every strategy with parameters an optimizer"
        optimizers.append(optimizer_class(plan_.optimizer[0])(own, lr=plan_.optimizer[1]))
    return optimizers


def train_step(mtl: MTLWrapper, optimizers: Sequence[torch.optim.Optimizer], x: Any, losses_of: Callable[[Any], Any],
               device: torch.device, more_batches: Callable[[], list[Any]] = list) -> tuple[Any, Any, float]:
    """The loop's step (the module docstring's) on ``x``, with the losses ``losses_of(predictions)`` and those of
    ``more_batches()`` (a request that reads several batches); returns the predictions, the losses and the
    step's time in seconds (on a GPU, synchronised at both ends)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for optimizer in optimizers:
        optimizer.zero_grad()
    with cached():
        predictions = mtl(x)
        losses = losses_of(predictions)
        mtl.backward(losses, more_batches=more_batches())
    mtl.step(*optimizers, post_step_losses=(
        (lambda: losses_of(mtl(x))) if mtl.strategy.wants_post_step_losses else None))
    sync()
    return predictions, losses, time.perf_counter() - start


def _train(problem: Problem, plan_: Plan, seed: int, steps: int, config: RunConfig,
           initial_model: nn.Module | None, progress: ProgressCallback | None, result: RunResult) -> None:
    device = config.torch_device
    torch.manual_seed(seed)
    model = copy.deepcopy(initial_model) if initial_model is not None else problem.build_model()
    torch.manual_seed(seed)  # the strategy's own draws do not depend on how the model came to be
    strategy = REGISTRY.create(plan_.name, num_tasks=problem.num_tasks, **plan_.options)
    mtl = MTLWrapper(model, strategy).to(device).train()
    order = torch.Generator().manual_seed(seed)
    sample, _ = next(iter(problem.epoch(torch.Generator().manual_seed(seed))))
    with torch.no_grad():
        mtl(to_device(sample, device))  # materialises lazily shaped strategies before the optimizers exist
    optimizers = _optimizers(mtl, problem, plan_)
    streams = [_endless(problem, torch.Generator().manual_seed(EXTRA_STREAM_SEED * (i + 1) + seed))
               for i in range(mtl.strategy.request.batches - 1)]
    scheduler = problem.lr_scheduler(optimizers[0])
    evaluator = _Evaluator(problem, mtl, device, steps, result)
    losses_log: list[Tensor] = []
    times: list[float] = []
    trace: list[Any] = []
    step = epoch = 0
    try:
        while step < steps:
            before = step
            for x, y in problem.epoch(order):
                if step >= steps:
                    break
                x, y = to_device(x, device), to_device(y, device)
                if config.conflict_every and step % config.conflict_every == 0:
                    cosines = measure_conflicts(mtl, problem, x, y)
                    upper = torch.triu_indices(len(cosines), len(cosines), offset=1)
                    result.conflicts["steps"].append(step)
                    result.conflicts["cosines"].append(cosines[upper[0], upper[1]].tolist())
                predictions, losses, seconds = train_step(
                    mtl, optimizers, x, lambda p, y=y: problem.losses(p, y), device,
                    lambda: [problem.losses(mtl(xm), ym) for xm, ym in (to_device(next(s), device) for s in streams)])
                times.append(seconds)
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
                epoch += 1
                evaluator.point(step, epoch, scheduler)
                continue
            break
    finally:  # a failed run keeps its curves up to the failure
        result.train_losses = torch.stack(losses_log).tolist() if losses_log else []
        result.trace = trace or None
        result.seconds_per_step = statistics.median(times) if times else None
        result.seconds_mean = statistics.fmean(times) if times else None
    result.metrics = evaluator.finish(step, epoch)
    bad = [f"{task}/{name}" for task, values in result.metrics.items() for name, value in values.items()
           if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"diverged: non-finite test metrics {bad}")


class _Evaluator:
    """When a run evaluates, and what it reports (:attr:`Problem.average_last`, :attr:`Problem.select_by_validation`).

    By default after training only; with ``average_last = n`` after each of the last n epochs (a run
    stopping inside an epoch counts its end as one), reporting the mean; with ``select_by_validation``
    the test metrics at each best validation score so far (ties: the later, as Nash-MTL's ``<=``),
    reporting the best's. A plateau schedule steps on the validation score.
    """

    def __init__(self, problem: Problem, mtl: MTLWrapper, device: torch.device, steps: int, result: RunResult) -> None:
        self.problem, self.mtl, self.device, self.result = problem, mtl, device, result
        per_epoch = max(problem.steps_per_epoch, 1)
        slots = problem.average_last - (1 if steps % per_epoch else 0)
        self.window_start = steps - steps % per_epoch - slots * per_epoch  # later epoch ends are averaged
        self.best: float | None = None
        self.evaluated_at: int | None = None

    def _eval(self, method: Callable[..., Any]) -> Any:
        self.mtl.eval()
        try:
            with torch.no_grad():
                return method(self.mtl, self.device)
        finally:
            self.mtl.train()

    def _record(self, step: int, epoch: int, validation: float | None) -> None:
        metrics = self._eval(self.problem.evaluate)
        self.result.evaluations.append({"step": step, "epoch": epoch, "validation": validation, "metrics": {
            task: {name: float(value) for name, value in values.items()} for task, values in metrics.items()}})

    def point(self, step: int, epoch: int, scheduler: Any = None, *, final: bool = False) -> None:
        """An epoch ended at ``step`` (or, ``final``, the run stopped inside one)."""
        problem = self.problem
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        validation = float(self._eval(problem.validation_score)) if problem.select_by_validation or plateau else None
        if scheduler is not None:
            scheduler.step(validation) if plateau else scheduler.step()
        if problem.select_by_validation:
            if self.best is None or validation <= self.best:  # type: ignore[operator]
                self.best = validation
                self._record(step, epoch, validation)
        elif final or step > self.window_start:
            self._record(step, epoch, validation)
        self.evaluated_at = step

    def finish(self, step: int, epoch: int) -> dict[str, dict[str, float]]:
        """The reported metrics, after a last evaluation when the run stopped inside an epoch."""
        if self.evaluated_at != step:
            self.point(step, epoch, final=True)
        chosen = [e["metrics"] for e in self.result.evaluations]
        if self.problem.select_by_validation:
            return chosen[-1]
        return {task: {name: math.fsum(m[task][name] for m in chosen) / len(chosen) for name in values}
                for task, values in chosen[-1].items()}


def _endless(problem: Problem, generator: torch.Generator) -> Iterator[Any]:
    while True:
        yield from problem.epoch(generator)


def train_and_evaluate(problem: Problem, strategy: str, seed: int = 0, *, steps: int | None = None,
                       **options: Any) -> list[float]:
    """Train one strategy from seed ``seed`` with :func:`run` (no conflict measurements); each task's primary metric.

    Raises:
        ComparisonError: The run failed (the message gives its error).
    """
    result = run(problem, StrategySpec(strategy, options), seed, RunConfig(steps=steps, conflict_every=0))
    if not result.ok:
        raise ComparisonError(f"{strategy} failed on {problem.name}: {result.error}")
    return [result.metrics[task][problem.task_metrics[task][0]] for task in problem.task_names]
