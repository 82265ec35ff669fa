"""``mtlzoo bench``: the time of a training step under each strategy, as a ratio to ``ls``.

Two reference models, with K linear (MLP) or 1x1-convolution (CNN) heads:

- ``mlp``: input 64, backbone 64-256-256-d (ReLU between layers), batch 256, one regression output per task;
- ``cnn``: input 3 x 16 x 16, backbone conv 3->32 (3x3), conv 32->d (3x3, stride 2), ReLU after each, so
  that the representation is a (batch, d, 8, 8) map; each head a 1x1 convolution to one channel (a
  dense prediction per task), batch 64. Strategies with a ``post_shape`` hyperparameter (the RotoGrad
  family) get ``post_shape=(8, 8)``: they rotate the channels.

Each step is the harness's training step (:func:`~mtlzoo.harness.training.train_step`) on a fixed random batch, with
Adam for the model (the strategy's own optimizer from its metadata) and the hyperparameters the metadata suggests. After
``warmup`` steps, ``steps`` steps are timed in ``rounds`` interleaved rounds (every strategy takes a turn each round, so
that a slow spell of the machine hits all of them); the median is reported with its ratio to ``ls``'s on the same model.
:func:`peak_bytes` measures the memory a step allocates (``benchmarks/vs_reference.py`` in the repository uses both).
"""

from __future__ import annotations

import itertools
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.harness.spec import BASELINE, default_strategies, optimizer_class, parse_spec, split_top_level
from mtlzoo.harness.tables import plain_table
from mtlzoo.harness.training import train_step
from mtlzoo.registry import REGISTRY, get_strategy, list_strategies
from mtlzoo.sharing import HardSharing
from mtlzoo.strategy import check_int
from mtlzoo.wrapper import MTLWrapper

MODELS = ("mlp", "cnn")
BATCH_SIZES = {"mlp": 256, "cnn": 64}
MAP_SIDE = 8


def reference_model(kind: str, num_tasks: int, dim: int) -> HardSharing:
    """The reference ``mlp`` or ``cnn`` with ``num_tasks`` heads and a representation of width ``dim``."""
    if kind == "mlp":
        backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, dim))
        return HardSharing(backbone, [nn.Linear(dim, 1) for _ in range(num_tasks)])
    if kind == "cnn":
        backbone = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU())
        return HardSharing(backbone, [nn.Conv2d(dim, 1, 1) for _ in range(num_tasks)])
    raise ValueError(f"Parameter `model` should be one of {MODELS}. Found {kind!r}.")


def reference_batch(kind: str, num_tasks: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if kind == "mlp":
        return (torch.randn(batch_size, 64, generator=generator),
                torch.randn(num_tasks, batch_size, 1, generator=generator))
    return (torch.randn(batch_size, 3, 2 * MAP_SIDE, 2 * MAP_SIDE, generator=generator),
            torch.randn(num_tasks, batch_size, 1, MAP_SIDE, MAP_SIDE, generator=generator))


@dataclass
class _Runner:
    label: str
    mtl: MTLWrapper
    optimizers: list[torch.optim.Optimizer]
    times: list[float]


def _canonical(spec: str) -> str:
    """A strategy spec (``"name"`` or ``"name:key=value"``) with the registered name (an alias resolved)."""
    name = split_top_level(spec, ":")[0]
    return get_strategy(name).name + spec[len(name):]


def bench(strategies: Sequence[str] | str | None = None, *, models: Sequence[str] = MODELS, tasks: int = 4,
          dim: int = 64, steps: int = 50, warmup: int = 10, rounds: int = 5, device: str | torch.device = "cpu",
          seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time a training step of each strategy on the reference models.

    Args:
        strategies: Names with options (``"upgrad:target=representation"``; a list or a comma-separated
            string), ``"all"``, or ``None`` for the strategies marked ``default_comparison``. ``ls`` is
            always timed (the ratios' denominator).
        models: ``"mlp"`` and/or ``"cnn"``.
        tasks: K, the number of heads.
        dim: d, the width of the representation (the CNN's channels).
        steps: Timed steps per strategy and model (spread over ``rounds``).
        warmup: Untimed steps first.
        rounds: Interleaved rounds (see the module docstring).
        device: Where to run.
        seed: Seeds the models and the batch.
        progress: Called with a short text after each model and strategy is set up and each round.

    Returns:
        A JSON-ready dict: ``settings``, ``environment`` and ``results``, one record per model and strategy with
        ``status`` (``"ok"`` / ``"failed"`` with ``error``), ``median_s``, ``p25_s``, ``p75_s`` and ``ratio_to_ls``.
    """
    device = torch.device(device)
    if strategies is None:
        names = [spec.name for spec in default_strategies()]
    elif strategies == "all":
        names = [e.name for e in list_strategies()]
    else:
        names = split_top_level(strategies, ",") if isinstance(strategies, str) else list(strategies)
    names = [_canonical(spec) for spec in names]  # unknown names fail here, with close matches
    names = [BASELINE, *[n for n in dict.fromkeys(names) if n != BASELINE]]
    for kind in models:
        if kind not in MODELS:
            raise ValueError(f"Parameter `models` should hold names from {MODELS}. Found {kind!r}.")
    for name, value in (("tasks", tasks), ("dim", dim), ("steps", steps), ("rounds", rounds)):
        check_int(name, value)
    results: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in models:
            results += _bench_model(kind, names, tasks, dim, steps, warmup, rounds, device, seed, progress)
    return {"settings": {"strategies": names, "models": list(models), "tasks": tasks, "dim": dim, "steps": steps,
                         "warmup": warmup, "rounds": rounds, "seed": seed,
                         "batch_sizes": {kind: BATCH_SIZES[kind] for kind in models}},
            "environment": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "results": results}


def _bench_model(kind: str, names: list[str], tasks: int, dim: int, steps: int, warmup: int, rounds: int,
                 device: torch.device, seed: int, progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    x, targets = (t.to(device) for t in reference_batch(kind, tasks, BATCH_SIZES[kind], generator))
    report = progress or (lambda text: None)

    def losses(predictions: list[Tensor]) -> list[Tensor]:
        return [nn.functional.mse_loss(p, t) for p, t in zip(predictions, targets)]

    def one_step(runner: _Runner) -> float:
        return train_step(runner.mtl, runner.optimizers, x, losses, device)[2]

    records: dict[str, dict[str, Any]] = {}
    runners: list[_Runner] = []
    for name in names:
        records[name] = record = {"model": kind, "strategy": name, "status": "ok", "error": None}
        try:
            torch.manual_seed(seed)
            strategy_name, options = parse_spec(name)
            entry = get_strategy(strategy_name)
            if kind == "cnn" and "post_shape" in entry.hyperparameters:  # the RotoGrad family rotates the channels
                options = {"post_shape": (MAP_SIDE, MAP_SIDE), **options}
            strategy = REGISTRY.create(strategy_name, num_tasks=tasks, **{**entry.info.suggested, **options})
            mtl = MTLWrapper(reference_model(kind, tasks, dim), strategy).to(device).train()
            with torch.no_grad():
                mtl(x)
            optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(mtl.model_parameters(), lr=1e-3)]
            own = [p for p in mtl.strategy_parameters() if p.requires_grad]
            if own:
                if entry.info.optimizer is None or entry.info.lr is None:
                    raise ValueError(f"{name} has learnable parameters but no optimizer in its metadata "
                                     "(StrategyInfo.optimizer, .lr).")
                optimizers.append(optimizer_class(entry.info.optimizer)(own, lr=entry.info.lr))
            runner = _Runner(name, mtl, optimizers, [])
            for _ in range(warmup):
                one_step(runner)
            runners.append(runner)
        except Exception as error:
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        report(f"{kind}: {name} ready")
    for r in range(rounds):
        for runner in list(runners):
            try:
                runner.times += [one_step(runner) for _ in range(steps // rounds + (r < steps % rounds))]
            except Exception as error:
                records[runner.label].update(status="failed", error=f"{type(error).__name__}: {error}")
                runners.remove(runner)
        report(f"{kind}: round done")
    for runner in runners:
        times = sorted(runner.times)
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        records[runner.label].update(median_s=statistics.median(times), p25_s=quartiles[0], p75_s=quartiles[2],
                                     steps=len(times))
    base = records[BASELINE].get("median_s")
    for record in records.values():
        median = record.get("median_s")
        record["ratio_to_ls"] = median / base if median is not None and base else None
    return list(records.values())


def _cell(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.3g}"


def report_table(report: dict[str, Any]) -> str:
    """A :func:`bench` report as a plain-text table per model: strategy, ms per step (median and
    quartiles), ratio to ``ls``, status; fits 80 columns unless a strategy's name is long."""
    settings, environment = report["settings"], report["environment"]
    parts = [f"Time of a training step (median over {settings['steps']} steps after {settings['warmup']} of warm-up), "
             f"K={settings['tasks']}, d={settings['dim']}, {environment['device']}, torch {environment['torch']}, "
             f"{environment['threads']} threads."]
    for kind in settings["models"]:
        rows = [[r["strategy"], _cell(r.get("median_s"), 1000), _cell(r.get("p25_s"), 1000),
                 _cell(r.get("p75_s"), 1000), _cell(r.get("ratio_to_ls")),
                 "ok" if r["status"] == "ok" else f"failed: {r['error']}"]
                for r in report["results"] if r["model"] == kind]
        parts.append(f"\n{kind} (batch {settings['batch_sizes'][kind]})\n" + plain_table(
            ["strategy", "ms/step", "p25", "p75", "x ls", "status"], rows, right=(1, 2, 3, 4)))
    return "\n".join(parts)


def peak_bytes(step: Callable[[], object]) -> int:
    """Peak of the tensor memory one call of ``step`` allocates beyond what was live before it (bytes).

    Read from torch's profiler (``profile_memory=True``): every allocation and free of the CPU
    allocator, in order; the peak of their running sum. Deterministic for a deterministic step.
    """
    from torch.profiler import ProfilerActivity, profile

    step()  # optimizer state and caches exist before the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))
