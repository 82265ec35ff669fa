"""mtlzoo beside rotograd 0.1.6.0, torchjd and plain training; and the growth of the step time with K and d.

Run from the repository (this file is not installed with mtlzoo)::

    python benchmarks/vs_reference.py --out reference.json            # the suite against the references
    python benchmarks/vs_reference.py --growth --out growth.json --plot figures/

Every figure is a ratio to plain, hand-written training (``z = backbone(x)``, the K heads,
``sum_k L_k``, one ``backward``, one optimizer step) on the reference MLP of the speed issue
(input 64, backbone 64-256-256-d, K linear heads, batch 256, MSE, SGD), taken in one process:

- every configuration of a section and the plain step are built on the same batch, warmed up,
  then timed in interleaved iterations: each iteration runs every configuration once (in a
  shuffled order, so that no configuration always follows the same one), so that a slow spell
  of a shared machine hits all of them;
- each step's time is divided by the plain step's time of the same iteration, and the median
  and quartiles of those paired ratios are reported. Paired ratios are far less disturbed by
  other jobs than ratios of separate medians. The time is this thread's CPU time
  (``time.thread_time``, ``clock="cpu"``, with ``torch.set_num_threads(1)`` so that the thread
  does all the work), which other processes on a loaded machine do not inflate; or the
  wall-clock time (``time.perf_counter``, ``clock="wall"``). On a 2-core machine with 4 times as
  many jobs as cores, the CPU clock gave quartiles within about 10% of the median where the wall
  clock's spanned a factor of 3, and reproduced the issue's quiet-machine ratios.

Sections:

- ``rotograd``: rotograd 0.1.6.0's ``VanillaMTL``, ``RotateOnly``, ``RotoGrad``, ``RotoGradNorm``
  beside mtlzoo's ``ls``, ``rotate_only``, ``rotograd``, ``rotograd_norm`` and the RotoGrad floor
  (a plain step plus the K rotations by fixed orthogonal matrices: ``z R_k`` forward, ``dz`` and
  ``dR_k`` backward), for each (d, K);
- ``torchjd``: torchjd's ``mtl_backward`` then ``jac_to_grad`` with its aggregators, a
  hand-written loop of K ``autograd.grad`` calls, and mtlzoo's surgery on the parameters and on
  the representation;
- ``weighting``: mtlzoo's ``ls`` and the loss-only weightings (ratios to plain and to ``ls``);
- ``memory``: the peak of the tensor memory a parameter-path step allocates (K=40, d=512 by
  default), on the Jacobian route (all K at once, and chunked) and on the Gramian route.

A reference package that is not installed gives rows with ``status = "not installed"``. Nothing
here installs anything or prints.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mtlzoo.caching import cached
from mtlzoo.harness.bench import peak_bytes, reference_model
from mtlzoo.harness.spec import optimizer_class, parse_spec, split_top_level
from mtlzoo.harness.tables import plain_table
from mtlzoo.protocol import Request
from mtlzoo.registry import REGISTRY, get_strategy
from mtlzoo.roles import GradientSurgery
from mtlzoo.strategy import StrategyInfo, check_int
from mtlzoo.wrapper import MTLWrapper

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BATCH = 256
LR = 1e-3
PLAIN = "plain (hand-written)"
FLOOR = "RotoGrad floor"
LS_FORWARD = "ls + a forward"
LS_OPTIMIZER = "ls + a second Adam"
SECTIONS = ("rotograd", "torchjd", "weighting", "memory")
ROTOGRAD_SETTINGS = ((128, 4), (512, 4), (128, 16))
ROTOGRAD_CLASSES = ("VanillaMTL", "RotateOnly", "RotoGrad", "RotoGradNorm")
MTLZOO_ROTOGRAD = ("ls", "rotate_only", "rotograd", "rotograd_norm")
TORCHJD_AGGREGATORS = ("Mean", "UPGrad", "PCGrad", "MGDA", "CAGrad", "NashMTL")
MTLZOO_SURGERY = ("ls", "upgrad", "pcgrad", "mgda", "cagrad", "nash_mtl")
WEIGHTINGS = ("uw", "dwa", "rlw", "si", "gls", "imtl_l", "stch", "famo", "gradnorm")
MEMORY_SETTING = (512, 40)
MEMORY_CHUNK = 8
GROWTH_STRATEGIES = ("ls", "uw", "upgrad:target=representation", "upgrad", "rotograd")
GROWTH_TASKS = (2, 4, 8, 16, 40)
GROWTH_DIMS = (64, 128, 256, 512, 1024)
GROWTH_BASE = (128, 4)
MIN_STEPS = 5
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
"""Timed iterations a time budget cannot cut."""

Step = Callable[[], object]


class NotInstalled(Exception):
    """A reference package is missing (its rows say so; nothing fails)."""


def _import(package: str) -> Any:
    try:
        return __import__(package)
    except ImportError as error:
        raise NotInstalled(f"{package} is not installed (pip install \"mtlzoo[reference]\")") from error


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        module = _import(package)
    except NotInstalled:
        return None
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "?"))


# ============================================================================ the steps
@dataclass
class Setting:
    """A batch of the reference MLP's problem: d, K and the data."""

    dim: int
    tasks: int
    x: Tensor
    targets: Tensor
    seed: int = 0

    @classmethod
    def make(cls, dim: int, tasks: int, seed: int = 0) -> Setting:
        generator = torch.Generator().manual_seed(seed)
        return cls(dim, tasks, torch.randn(BATCH, 64, generator=generator),
                   torch.randn(tasks, BATCH, 1, generator=generator), seed)

    def model(self) -> Any:
        torch.manual_seed(self.seed)
        return reference_model("mlp", self.tasks, self.dim)

    def losses(self, predictions: Iterable[Tensor]) -> list[Tensor]:
        return [nn.functional.mse_loss(p, t) for p, t in zip(predictions, self.targets)]


def plain_step(s: Setting) -> Step:
    """Hand-written summed-loss training: the denominator of every ratio."""
    model = s.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> object:
        optimizer.zero_grad()
        z = model.backbone(s.x)
        loss = sum(s.losses(head(z) for head in model.heads))
        loss.backward()
        optimizer.step()
        return loss

    return step


def floor_step(s: Setting) -> Step:
    """A plain step plus K rotations by fixed orthogonal matrices (``z R_k``; ``dz`` and ``dR_k`` backward)."""
    model = s.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rotations = torch.linalg.qr(torch.randn(s.tasks, s.dim, s.dim, generator=torch.Generator().manual_seed(1)))[0]
    rotations.requires_grad_()

    def step() -> object:
        optimizer.zero_grad()
        rotations.grad = None
        z = model.backbone(s.x)
        loss = sum(s.losses(head(z @ rotations[k]) for k, head in enumerate(model.heads)))
        loss.backward()
        optimizer.step()
        return rotations.grad

    return step


def _strategy_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The metadata's suggested hyperparameters (GradNorm's ``alpha``), under the given ones."""
    return {**get_strategy(name).info.suggested, **options}


def mtlzoo_step(s: Setting, spec: str | Any, *, chunk: int | None = None, extra_forward: bool = False,
                own_in_model_optimizer: bool = False, second_optimizer: bool = False) -> Step:
    """A step of the harness (``mtl.backward``, ``mtl.step``) with SGD for the model.

    ``spec`` is a name with options (``"upgrad:target=representation"``) or a strategy instance. The
    strategy's own parameters get the optimizer of its metadata (a second optimizer, whose own
    per-step cost is part of the figure), or with ``own_in_model_optimizer`` a group of the model's
    SGD at the metadata's learning rate; FAMO gets its post-step forward.
    ``extra_forward`` adds such a forward (the losses after the step, without a graph) to any
    strategy: ``ls`` with it is what FAMO's target is measured against. ``second_optimizer`` adds a
    torch Adam stepping K numbers that get a gradient every step, apart from the model: ``ls`` with it
    is what a strategy whose K parameters have their own Adam (UW, IMTL-L) is measured against.
    """
    if isinstance(spec, str):
        name, options = parse_spec(spec)
        torch.manual_seed(s.seed)
        strategy = REGISTRY.create(name, num_tasks=s.tasks, **_strategy_options(name, options))
    else:
        strategy = spec
    mtl = MTLWrapper(s.model(), strategy, jacobian_chunk_size=chunk).train()
    with torch.no_grad():
        mtl(s.x)  # strategies that infer a shape (RotoGrad's rotations) create their parameters here
    own = [p for p in mtl.strategy_parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": list(mtl.model_parameters())}]
    if own and own_in_model_optimizer:
        groups.append({"params": own, "lr": strategy.info.lr or LR})
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(groups, lr=LR)]
    if own and not own_in_model_optimizer:
        info = strategy.info
        optimizers.append(optimizer_class(info.optimizer or "sgd")(own, lr=info.lr or LR))
    apart = torch.nn.Parameter(torch.zeros(s.tasks)) if second_optimizer else None
    if apart is not None:
        optimizers.append(torch.optim.Adam([apart], lr=1e-2))
    post = (lambda: s.losses(mtl(s.x))) if mtl.strategy.wants_post_step_losses else None
    after = s.losses if extra_forward else None

    def step() -> object:
        for optimizer in optimizers:
            optimizer.zero_grad()
        with cached():
            mtl.backward(s.losses(mtl(s.x)))
        if apart is not None:
            apart.grad = torch.ones_like(apart)
        mtl.step(*optimizers, post_step_losses=post)
        if after is not None:
            with torch.no_grad():
                return after(mtl(s.x))
        return mtl

    return step


def rotograd_step(s: Setting, cls_name: str) -> Step:
    """rotograd 0.1.6.0, as its README trains it: ``with rotograd.cached()``, ``model.backward(losses)``."""
    rotograd = _import("rotograd")
    model = s.model()
    heads = list(model.heads)
    kwargs: dict[str, Any] = dict(get_strategy("rotograd_norm").info.suggested) if cls_name == "RotoGradNorm" else {}
    if cls_name == "VanillaMTL":
        wrapped = rotograd.VanillaMTL(model.backbone, heads)
    else:
        torch.manual_seed(s.seed)
        wrapped = getattr(rotograd, cls_name)(model.backbone, heads, s.dim, burn_in_period=20, **kwargs)
    wrapped.train()
    model_params = list(wrapped.model_parameters())
    known = {id(p) for p in model_params}
    own = [p for p in wrapped.parameters() if id(p) not in known]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.SGD(model_params, lr=LR)]
    if own:
        optimizers.append(torch.optim.Adam(own, lr=1e-4))

    def step() -> object:
        for optimizer in optimizers:
            optimizer.zero_grad()
        with rotograd.cached():
            wrapped.backward(s.losses(wrapped(s.x)))
        for optimizer in optimizers:
            optimizer.step()
        return wrapped

    return step


def _torchjd_aggregator(name: str, tasks: int) -> Any:
    aggregation = _import("torchjd.aggregation").aggregation
    if name == "CAGrad":
        return aggregation.CAGrad(c=get_strategy("cagrad").hyperparameters["c"])
    if name == "NashMTL":
        return aggregation.NashMTL(n_tasks=tasks)
    return getattr(aggregation, name)()


def torchjd_step(s: Setting, aggregator: str, *, gramian: bool = False) -> Step:
    """torchjd: ``mtl_backward(losses, features=z)`` then ``jac_to_grad(shared, aggregator)``."""
    autojac = _import("torchjd.autojac").autojac
    model = s.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    shared = list(model.backbone.parameters())
    combine = _torchjd_aggregator(aggregator, s.tasks)
    options = {"optimize_gramian_computation": True} if gramian else {}

    def step() -> object:
        optimizer.zero_grad()
        z = model.backbone(s.x)
        autojac.mtl_backward(s.losses(head(z) for head in model.heads), features=z)
        autojac.jac_to_grad(shared, combine, **options)
        optimizer.step()
        return z

    return step


def autograd_loop_step(s: Setting) -> Step:
    """By hand: K ``autograd.grad`` calls for the per-task gradients on the backbone, their mean applied."""
    model = s.model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    shared = list(model.backbone.parameters())
    head_params = [p for head in model.heads for p in head.parameters()]

    def step() -> object:
        optimizer.zero_grad()
        z = model.backbone(s.x)
        losses = s.losses(head(z) for head in model.heads)
        rows = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
        torch.autograd.backward(sum(losses), inputs=head_params)
        for i, param in enumerate(shared):
            param.grad = torch.stack([row[i] for row in rows]).mean(0)
        optimizer.step()
        return z

    return step


class JacobianProbe(GradientSurgery):
    """The Jacobian route on its own: reads the K x n Jacobian on the shared parameters, applies its row sum."""

    info = StrategyInfo(name="jacobian_probe", kind="surgery", summary="Sums the rows of the Jacobian.",
                        request=Request("parameters", "gradients"))

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        return grads.sum(0)


# ============================================================================ timing
def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "p25": quartiles[0], "p75": quartiles[2]}


def _paired(times: Sequence[float], base: Sequence[float]) -> dict[str, float] | None:
    ratios = [t / b for t, b in zip(times, base) if b > 0]
    return _spread(ratios) if ratios else None


@dataclass
class Entry:
    """One configuration of a section: its label, the package it measures and how to build its step."""

    label: str
    package: str
    make: Callable[[], Step]
    note: str = ""


def time_paired(entries: Sequence[Entry], *, steps: int, warmup: int, references: Sequence[str] = (),
                budget_s: float | None = None, seed: int = 0, clock: str = "cpu",
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Build, warm up and time ``entries`` (the first is the denominator) in interleaved iterations.

    Each iteration runs every configuration once, in an order shuffled by a generator seeded
    with ``seed``. ``steps`` iterations, or fewer (at least :data:`MIN_STEPS`) once the timed iterations have
    taken ``budget_s`` seconds (``None``: no limit). ``clock`` is ``"wall"`` (``time.perf_counter``)
    or ``"cpu"`` (``time.thread_time``: this thread's CPU time, untouched by other processes on a
    loaded machine, but blind to torch's other threads: use it with ``torch.set_num_threads(1)``).

    Returns one record per entry: ``status`` (``"ok"``, ``"not installed"``, ``"failed"``),
    ``median_s`` and ``ratio`` (median and quartiles of the per-iteration ratios to the first
    entry), and ``vs`` (idem to each label of ``references`` that was timed).
    """
    records = {e.label: {"label": e.label, "package": e.package, "note": e.note, "status": "ok", "error": None}
               for e in entries}
    runners: dict[str, Step] = {}
    for entry in entries:
        try:
            step = entry.make()
            for _ in range(warmup):
                step()
            runners[entry.label] = step
        except NotInstalled as error:
            records[entry.label].update(status="not installed", error=str(error))
        except Exception as error:
            records[entry.label].update(status="failed", error=f"{type(error).__name__}: {error}")
        if progress is not None:
            progress(f"{entry.label} ready")
    if clock not in CLOCKS:
        raise ValueError(f"Parameter `clock` should be one of {tuple(CLOCKS)}. Found {clock!r}.")
    timer = CLOCKS[clock]
    base = entries[0].label
    times: dict[str, list[float]] = {label: [] for label in runners}
    labels = list(runners)
    order = random.Random(seed)
    started = time.perf_counter()
    for iteration in range(steps):
        if budget_s is not None and iteration >= MIN_STEPS and time.perf_counter() - started > budget_s:
            break
        order.shuffle(labels)  # no configuration always follows the same one (caches, freed memory)
        for label in list(labels):
            if label not in runners:
                continue
            try:
                start = timer()
                runners[label]()
                times[label].append(timer() - start)
            except Exception as error:
                records[label].update(status="failed", error=f"{type(error).__name__}: {error}")
                del runners[label]
    if base not in runners:
        for label in runners:
            records[label]["median_s"] = statistics.median(times[label])
        return list(records.values())
    for label in runners:
        record = records[label]
        record["median_s"] = statistics.median(times[label])
        record["steps"] = len(times[label])
        record["ratio"] = _paired(times[label], times[base])
        record["vs"] = {ref: _paired(times[label], times[ref]) for ref in references if ref in runners and ref != label}
    return list(records.values())


# ============================================================================ memory
def memory_entries(s: Setting, chunk: int) -> list[tuple[str, str, str, Callable[[], Step]]]:
    """(label, route, package, build) of the memory section."""
    rows: list[tuple[str, str, str, Callable[[], Step]]] = [
        (PLAIN, "plain", "-", lambda: plain_step(s)),
        ("ls", "plain", "mtlzoo", lambda: mtlzoo_step(s, "ls")),
        ("Jacobian, all K at once", "jacobian", "mtlzoo",
         lambda: mtlzoo_step(s, JacobianProbe(s.tasks), chunk=s.tasks)),
        (f"Jacobian, jacobian_chunk_size={chunk}", "jacobian", "mtlzoo",
         lambda: mtlzoo_step(s, JacobianProbe(s.tasks), chunk=chunk)),
        ("Jacobian, jacobian_chunk_size=1", "jacobian", "mtlzoo",
         lambda: mtlzoo_step(s, JacobianProbe(s.tasks), chunk=1)),
    ]
    for name in ("upgrad", "mgda"):
        rows.append((name, "gramian", "mtlzoo", lambda name=name: mtlzoo_step(s, name)))
        rows.append((f"{name}, jacobian_chunk_size={chunk}", "gramian", "mtlzoo",
                     lambda name=name: mtlzoo_step(s, name, chunk=chunk)))
    rows.append(("torchjd UPGrad", "jacobian", "torchjd", lambda: torchjd_step(s, "UPGrad")))
    rows.append(("torchjd UPGrad, optimize_gramian_computation", "gramian", "torchjd",
                 lambda: torchjd_step(s, "UPGrad", gramian=True)))
    return rows


def memory(dim: int, tasks: int, chunk: int, seed: int = 0,
           progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Peak tensor memory of one step per configuration of :func:`memory_entries`."""
    s = Setting.make(dim, tasks, seed)
    shared = sum(p.numel() for p in s.model().backbone.parameters())
    records = []
    for label, route, package, make in memory_entries(s, chunk):
        record: dict[str, Any] = {"label": label, "route": route, "package": package, "status": "ok", "error": None,
                                  "dim": dim, "tasks": tasks, "jacobian_bytes": 4 * tasks * shared}
        try:
            record["peak_bytes"] = peak_bytes(make())
        except NotInstalled as error:
            record.update(status="not installed", error=str(error))
        except Exception as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        records.append(record)
        if progress is not None:
            progress(f"memory: {label}")
    return records


# ============================================================================ the suite
def _rotograd_entries(s: Setting) -> list[Entry]:
    entries = [Entry(PLAIN, "-", lambda: plain_step(s)), Entry(FLOOR, "-", lambda: floor_step(s))]
    entries += [Entry(f"rotograd {name}", "rotograd", lambda name=name: rotograd_step(s, name))
                for name in ROTOGRAD_CLASSES]
    entries += [Entry(name, "mtlzoo", lambda name=name: mtlzoo_step(s, name)) for name in MTLZOO_ROTOGRAD]
    return entries


def _torchjd_entries(s: Setting) -> list[Entry]:
    entries = [Entry(PLAIN, "-", lambda: plain_step(s)),
               Entry("K autograd.grad calls", "-", lambda: autograd_loop_step(s))]
    entries += [Entry(f"torchjd {name}", "torchjd", lambda name=name: torchjd_step(s, name))
                for name in TORCHJD_AGGREGATORS]
    for name in MTLZOO_SURGERY:
        entries.append(Entry(name, "mtlzoo", lambda name=name: mtlzoo_step(s, name)))
        if name != "ls" and "target" in get_strategy(name).hyperparameters:
            spec = f"{name}:target=representation"
            entries.append(Entry(spec, "mtlzoo", lambda spec=spec: mtlzoo_step(s, spec)))
    return entries


def _weighting_entries(s: Setting) -> list[Entry]:
    entries = [Entry(PLAIN, "-", lambda: plain_step(s)), Entry("ls", "mtlzoo", lambda: mtlzoo_step(s, "ls")),
               Entry(LS_FORWARD, "mtlzoo", lambda: mtlzoo_step(s, "ls", extra_forward=True),
                     "FAMO's target: ls and the forward its post-step update needs"),
               Entry(LS_OPTIMIZER, "mtlzoo", lambda: mtlzoo_step(s, "ls", second_optimizer=True),
                     "ls and a torch Adam on K numbers apart: the target of a strategy with its own Adam")]
    for name in WEIGHTINGS:
        note = "with its post-step forward" if get_strategy(name).cls.wants_post_step_losses else ""
        entries.append(Entry(name, "mtlzoo", lambda name=name: mtlzoo_step(s, name), note))
        if get_strategy(name).info.learnable:
            entries.append(Entry(f"{name} (own parameters in the model's optimizer)", "mtlzoo",
                                 lambda name=name: mtlzoo_step(s, name, own_in_model_optimizer=True),
                                 "one optimizer: the strategy's parameters as a group of the model's SGD"))
    return entries


def vs_reference(*, sections: Sequence[str] = SECTIONS,
                 rotograd_settings: Sequence[tuple[int, int]] = ROTOGRAD_SETTINGS, dim: int = 128, tasks: int = 4,
                 memory_setting: tuple[int, int] = MEMORY_SETTING,
                 memory_chunk: int = MEMORY_CHUNK, steps: int = 60, warmup: int = 5, budget_s: float | None = 30.0,
                 clock: str = "cpu", seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the sections of the suite (see the module docstring); a JSON-ready dict.

    Args:
        sections: Which of :data:`SECTIONS` to run.
        rotograd_settings: (d, K) pairs of the ``rotograd`` section.
        dim, tasks: d and K of the ``torchjd`` and ``weighting`` sections.
        memory_setting: (d, K) of the ``memory`` section; ``memory_chunk`` its chunked route's chunk.
        steps: Timed iterations (each runs every configuration of the section once).
        warmup: Untimed steps of each configuration first.
        budget_s: Seconds of timed iterations per section and setting, after which it stops early
            (at least 5 iterations; ``None``: always ``steps``). Each record says how many it took.
        clock: ``"cpu"`` (this thread's CPU time, on one torch thread for the run) or ``"wall"``
            (see :func:`time_paired`).
        seed: Seeds the models and the batches.
        progress: Called with a short text as configurations are built and sections finish.

    Returns:
        ``settings``, ``environment`` and ``results``: one record per section, setting and
        configuration (see :func:`time_paired`; ``memory`` records carry ``peak_bytes``).
    """
    if clock not in CLOCKS:
        raise ValueError(f"Parameter `clock` should be one of {tuple(CLOCKS)}. Found {clock!r}.")
    for section in sections:
        if section not in SECTIONS:
            raise ValueError(f"Parameter `sections` should hold names from {SECTIONS}. Found {section!r}.")
    for name, value in (("steps", steps), ("dim", dim), ("tasks", tasks), ("memory_chunk", memory_chunk),
                        *((f"rotograd_settings[{i}]", v) for i, pair in enumerate(rotograd_settings) for v in pair),
                        *(("memory_setting", v) for v in memory_setting)):
        check_int(name, value)
    results: list[dict[str, Any]] = []

    def add(section: str, d: int, k: int, records: list[dict[str, Any]]) -> None:
        results.extend({"section": section, "dim": d, "tasks": k, **record} for record in records)
        if progress is not None:
            progress(f"{section} d={d} K={k} done")

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _threads_for(clock):
        warnings.simplefilter("ignore")
        environment = _environment()
        if "rotograd" in sections:
            for d, k in rotograd_settings:
                add("rotograd", d, k, time_paired(_rotograd_entries(Setting.make(d, k, seed)), steps=steps,
                                                  warmup=warmup, references=("ls", FLOOR), budget_s=budget_s,
                                                  clock=clock, progress=progress))
        if "torchjd" in sections:
            add("torchjd", dim, tasks, time_paired(_torchjd_entries(Setting.make(dim, tasks, seed)), steps=steps,
                                                   warmup=warmup, references=("ls",), budget_s=budget_s,
                                                   clock=clock, progress=progress))
        if "weighting" in sections:
            add("weighting", dim, tasks, time_paired(_weighting_entries(Setting.make(dim, tasks, seed)),
                                                     steps=steps, warmup=warmup,
                                                     references=("ls", LS_FORWARD, LS_OPTIMIZER),
                                                     budget_s=budget_s, clock=clock, progress=progress))
        if "memory" in sections:
            d, k = memory_setting
            results.extend({"section": "memory", **record}
                           for record in memory(d, k, memory_chunk, seed, progress))
    return {
        "settings": {"sections": list(sections), "rotograd_settings": [list(p) for p in rotograd_settings],
                     "dim": dim, "tasks": tasks, "memory_setting": list(memory_setting),
                     "memory_chunk": memory_chunk, "steps": steps, "warmup": warmup, "budget_s": budget_s,
                     "clock": clock, "seed": seed, "batch": BATCH,
                     "model": "mlp 64-256-256-d, K linear heads, MSE, SGD"},
        "environment": environment,
        "results": results,
    }


@contextlib.contextmanager
def _threads_for(clock: str) -> Iterator[None]:
    """One torch thread under the CPU clock (the thread's CPU time then covers the whole step)."""
    threads = torch.get_num_threads()
    if clock == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _environment() -> dict[str, Any]:
    import mtlzoo

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "mtlzoo": mtlzoo.__version__,
            "rotograd": _version("rotograd"), "torchjd": _version("torchjd")}


def growth(strategies: Sequence[str] = GROWTH_STRATEGIES, *, tasks: Sequence[int] = GROWTH_TASKS,
           dims: Sequence[int] = GROWTH_DIMS, base: tuple[int, int] = GROWTH_BASE, steps: int = 20,
           warmup: int = 2, budget_s: float | None = 15.0, clock: str = "cpu", seed: int = 0,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Step time as a ratio to plain training as K grows (at d = ``base[0]``) and as d grows (at K = ``base[1]``).

    Each setting times ``strategies`` and the plain step as :func:`vs_reference` does (paired
    ratios; ``steps`` iterations or ``budget_s`` seconds, whichever ends first).

    Returns:
        ``settings``, ``environment`` and ``results``: one record per axis (``"tasks"`` or
        ``"dim"``), setting and strategy, with ``ratio`` (median and quartiles) and ``median_s``.
    """
    for name, values in (("tasks", tasks), ("dims", dims), ("base", base)):
        for value in values:
            check_int(name, value)
    check_int("steps", steps)
    if clock not in CLOCKS:
        raise ValueError(f"Parameter `clock` should be one of {tuple(CLOCKS)}. Found {clock!r}.")
    for spec in strategies:
        get_strategy(parse_spec(spec)[0])  # unknown names fail here, with close matches
    grid = [("tasks", base[0], k) for k in tasks] + [("dim", d, base[1]) for d in dims]
    results: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _threads_for(clock):
        warnings.simplefilter("ignore")
        environment = _environment()
        for axis, d, k in grid:
            s = Setting.make(d, k, seed)
            entries = [Entry(PLAIN, "-", lambda s=s: plain_step(s))]
            entries += [Entry(spec, "mtlzoo", lambda s=s, spec=spec: mtlzoo_step(s, spec)) for spec in strategies]
            records = time_paired(entries, steps=steps, warmup=warmup, budget_s=budget_s, clock=clock)
            results.extend({"axis": axis, "dim": d, "tasks": k, **r} for r in records if r["label"] != PLAIN)
            if progress is not None:
                progress(f"growth d={d} K={k} done")
    return {"settings": {"strategies": list(strategies), "tasks": list(tasks), "dims": list(dims),
                         "base": list(base), "steps": steps, "warmup": warmup, "budget_s": budget_s, "clock": clock,
                         "seed": seed, "batch": BATCH},
            "environment": environment, "results": results}


# ============================================================================ text
def _cell(spread: dict[str, float] | None) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:.2f}x [{spread['p25']:.2f}, {spread['p75']:.2f}]"


def _status_cell(record: dict[str, Any]) -> str:
    if record["status"] == "not installed":
        return "not installed"
    error = str(record.get("error"))
    return "failed: " + (error if len(error) <= 120 else error[:117] + "...")


def report_rows(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables of a :func:`vs_reference` report: (title, header, rows) per section and setting."""
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for record in report["results"]:
        groups.setdefault((record["section"], record.get("dim"), record.get("tasks")), []).append(record)
    for (section, d, k), records in groups.items():
        if section == "memory":
            header = ["configuration", "route", "peak memory", "x plain", "peak - K x n Jacobian", "note"]
            plain = next((r.get("peak_bytes") for r in records if r["label"] == PLAIN), None)
            rows = []
            for r in records:
                if r["status"] != "ok":
                    rows.append([r["label"], r["route"], "-", "-", "-", _status_cell(r)])
                    continue
                ratio = f"{r['peak_bytes'] / plain:.1f}x" if plain else "-"
                beyond = (f"{(r['peak_bytes'] - r['jacobian_bytes']) / 2**20:.1f} MiB" if r["route"] != "plain"
                          else "-")
                rows.append([r["label"], r["route"], f"{r['peak_bytes'] / 2**20:.1f} MiB", ratio, beyond, ""])
            jacobian = records[0].get("jacobian_bytes", 0) / 2**20
            tables.append((f"memory: peak tensor memory of one step, d={d}, K={k} (the K x n Jacobian on the "
                           f"shared parameters: {jacobian:.1f} MiB)", header, rows))
            continue
        refs = {"rotograd": ["ls", FLOOR], "torchjd": ["ls"], "weighting": ["ls", LS_FORWARD, LS_OPTIMIZER]}[section]
        header = ["configuration", "package", "x plain [quartiles]", *[f"x {ref}" for ref in refs], "note"]
        rows = []
        for r in records:
            if r["status"] != "ok":
                rows.append([r["label"], r["package"], "-", *["-" for _ in refs], _status_cell(r)])
                continue
            rows.append([r["label"], r["package"], _cell(r.get("ratio")),
                         *[_cell(r.get("vs", {}).get(ref)) if r["label"] != ref else "1" for ref in refs],
                         r.get("note", "")])
        tables.append((f"{section}: d={d}, K={k}, batch {BATCH}; step time / plain step time of the same iteration",
                       header, rows))
    return tables


def growth_rows(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables of a :func:`growth` report: one per axis, a column per setting."""
    tables = []
    for axis in ("tasks", "dim"):
        records = [r for r in report["results"] if r["axis"] == axis]
        values = list(dict.fromkeys(r[axis] for r in records))
        labels = list(dict.fromkeys(r["label"] for r in records))
        by = {(r["label"], r[axis]): r for r in records}
        rows = [[label, *[f"{by[(label, v)]['ratio']['median']:.2f}x" if by[(label, v)]["status"] == "ok"
                          and "ratio" in by[(label, v)] else "-" for v in values]] for label in labels]
        other = "d" if axis == "tasks" else "K"
        fixed = records[0]["dim" if axis == "tasks" else "tasks"] if records else "-"
        tables.append((f"growth with {'K' if axis == 'tasks' else 'd'} ({other}={fixed}): median step time / plain",
                       ["strategy", *[str(v) for v in values]], rows))
    return tables


# ============================================================================ plots
GROWTH_AXES = {"tasks": ("K, the number of tasks", "d"), "dim": ("d, the width of the representation", "K")}


def growth_figure(report: dict[str, Any], axis: str) -> Figure:
    """Step time / plain step time against K (``axis="tasks"``) or d (``axis="dim"``), log-log: one line per
    strategy of a :func:`growth` report through the medians, a band between the quartiles."""
    if axis not in GROWTH_AXES:
        raise ValueError(f"Parameter `axis` should be one of {tuple(GROWTH_AXES)}. Found {axis!r}.")
    from mtlzoo.harness.plots import _matplotlib, styles

    figure_class = _matplotlib()
    from matplotlib.ticker import NullLocator

    records = [r for r in report["results"] if r["axis"] == axis and r.get("status") == "ok" and "ratio" in r]
    labels = list(dict.fromkeys(r["label"] for r in records))
    drawn = styles(labels)
    fig = figure_class(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for label in labels:
        rows = sorted((r for r in records if r["label"] == label), key=lambda r: r[axis])
        xs = [r[axis] for r in rows]
        style = drawn[label]
        ax.plot(xs, [r["ratio"]["median"] for r in rows], marker=style.marker, color=style.color,
                linestyle=style.linestyle, label=label)
        ax.fill_between(xs, [r["ratio"]["p25"] for r in rows], [r["ratio"]["p75"] for r in rows],
                        color=style.color, alpha=0.15, linewidth=0)
    title, other = GROWTH_AXES[axis]
    fixed = records[0]["dim" if axis == "tasks" else "tasks"] if records else "?"
    ax.set_xscale("log", base=2)
    ticks = sorted({r[axis] for r in records})
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel(title)
    ax.set_ylabel("step time / plain step time")
    ax.set_title(f"Reference MLP, batch {report['settings'].get('batch', 256)}, {other} = {fixed}", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    handles, shown = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, shown, loc="outside lower center", ncols=min(len(shown), 5), fontsize="small")
    return fig


def save_growth_plots(report: dict[str, Any], out: str | Path, dpi: int = 110) -> list[Path]:
    """Write ``out/growth_tasks.png`` and ``out/growth_dim.png`` from a :func:`growth` report; returns the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for axis in GROWTH_AXES:
        if any(r["axis"] == axis for r in report["results"]):
            paths.append(folder / f"growth_{axis}.png")
            growth_figure(report, axis).savefig(paths[-1], dpi=dpi)
    return paths


# ============================================================================ the command
def _pairs(text: str, option: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"Option `{option}` should be DxK pairs like 128x4,512x4. Found {text!r}.")
    return [(p[0], p[1]) for p in pairs]


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Option `{option}` should be comma-separated ints. Found {text!r}.") from None


def build_parser() -> Any:
    """The command line of this script (what ``mtlzoo bench --vs-reference`` and ``--growth`` were)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python benchmarks/vs_reference.py",
        description="mtlzoo beside rotograd 0.1.6.0, torchjd and hand-written training (paired per-step ratios, "
                    "peak memory), tables on stdout; with --growth, the ratio to plain training as K and d grow.")
    parser.add_argument("--growth", action="store_true",
                        help="the ratio to plain training as K grows (--growth-tasks) and d grows (--growth-dims)")
    parser.add_argument("--tasks", type=int, default=4, metavar="K", help="number of tasks (default 4)")
    parser.add_argument("--dim", type=int, default=128, metavar="D", help="width of the representation (default 128)")
    parser.add_argument("--steps", type=int, metavar="N", help="timed steps (default 60; --growth 20)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed steps first (default 5; --growth 2)")
    parser.add_argument("--sections", default=",".join(SECTIONS), metavar="LIST",
                        help="which of rotograd, torchjd, weighting, memory (default: all)")
    parser.add_argument("--rotograd-settings", default="128x4,512x4,128x16", metavar="DxK,...",
                        help="(d, K) of the rotograd section (default: 128x4,512x4,128x16)")
    parser.add_argument("--memory-setting", default="512x40", metavar="DxK",
                        help="(d, K) of the memory section (default: 512x40)")
    parser.add_argument("--memory-chunk", type=int, default=MEMORY_CHUNK, metavar="N",
                        help="jacobian_chunk_size of the chunked rows (default 8)")
    parser.add_argument("--growth-strategies", metavar="LIST",
                        help="--growth: strategies, with options as name:key=value (default: ls, uw, "
                             "upgrad:target=representation, upgrad, rotograd)")
    parser.add_argument("--growth-tasks", default="2,4,8,16,40", metavar="LIST", help="--growth: K values (at d=128)")
    parser.add_argument("--growth-dims", default="64,128,256,512,1024", metavar="LIST",
                        help="--growth: d values (at K=4)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="stop timing a section (a growth setting) after this many seconds, at 5 iterations at "
                             "least (default 30; --growth 15); 0: always --steps")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="this thread's CPU time, on one torch thread (default: steady on a loaded machine), or "
                             "wall-clock time")
    parser.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE")
    parser.add_argument("--plot", metavar="DIR", help="--growth: also write growth_tasks.png and growth_dim.png there")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite (or ``--growth``), print its tables, and write the report with ``--out``."""
    import json
    import sys

    from mtlzoo.errors import MTLZooError

    args = build_parser().parse_args(argv)
    timing: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    timing["clock"] = args.clock
    if args.budget is not None:
        timing["budget_s"] = args.budget or None

    def progress(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    try:
        if args.growth:
            strategies = (split_top_level(args.growth_strategies, ",") if args.growth_strategies
                          else GROWTH_STRATEGIES)
            report = growth(strategies, tasks=_ints(args.growth_tasks, "--growth-tasks"),
                            dims=_ints(args.growth_dims, "--growth-dims"), progress=progress, **timing)
            tables = growth_rows(report)
        else:
            report = vs_reference(sections=[s.strip() for s in args.sections.split(",") if s.strip()],
                                  rotograd_settings=_pairs(args.rotograd_settings, "--rotograd-settings"),
                                  dim=args.dim, tasks=args.tasks,
                                  memory_setting=_pairs(args.memory_setting, "--memory-setting")[0],
                                  memory_chunk=args.memory_chunk, progress=progress, **timing)
            tables = report_rows(report)
    except (MTLZooError, ValueError) as error:
        print(f"vs_reference: {error}", file=sys.stderr)
        return 2
    for title, header, rows in tables:
        print(f"\n{title}\n{plain_table(header, rows)}")
    if args.growth and args.plot:
        for path in save_growth_plots(report, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
