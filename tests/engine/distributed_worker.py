"""Training runs for tests/engine/test_distributed.py: W processes on gloo (CPU), each on its share of a batch,
and the same run in one process on the whole batch. Runs are cases, many per launch, so CI spawns few processes."""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import mtlzoo
from mtlzoo.engine.distributed import strategy_names
from tests.helpers import batch, required_kwargs, small_model

STEPS = 3
EVEN = (8, 8)
ILL_CONDITIONED = {"famo": "differences of the logarithms of nearly equal losses", "nash_mtl": "an iterative solver",
                   "sdmgrad": "20 projected steps of size 10 (its authors' lr), each amplifying rounding"}
"""Strategies whose maths amplifies rounding: run in float64, as the issue allows (the reason, for the report)."""

Case = tuple[str, "str | None"]
Absence = Callable[[int, int], set[int]]
"""``absent(step, rank)``: the tasks without labels in rank ``rank``'s share of batch ``step``."""


def cases_of_the_registry() -> list[Case]:
    """Every registered strategy, once per target it supports (``None``: it has no ``target`` setting)."""
    cases: list[Case] = []
    for entry in mtlzoo.list_strategies():
        if "target" not in entry.hyperparameters:
            cases.append((entry.name, None))
            continue
        for target in ("representation", "parameters"):
            try:
                mtlzoo.create(entry.name, num_tasks=3, target=target, **required_kwargs(entry.name))
            except ValueError:
                continue  # a target the strategy does not support
            cases.append((entry.name, target))
    return cases


def build(name: str, target: str | None, seed: int, *, distributed: Any = None,
          model: nn.Module | None = None) -> tuple[mtlzoo.MTLWrapper, torch.optim.Optimizer]:
    """The wrapper (its lazily shaped strategy materialised) and an SGD with momentum over it, from ``seed``."""
    torch.manual_seed(seed)
    dtype = torch.float64 if name in ILL_CONDITIONED else torch.float32
    options = {} if target is None else {"target": target}
    mtl = mtlzoo.MTLWrapper(small_model() if model is None else model, name, distributed=distributed,
                            **required_kwargs(name), **options).to(dtype)
    with torch.no_grad():
        mtl(batch()[0][:2].to(dtype))
    groups: list[dict[str, Any]] = [{"params": list(mtl.model_parameters())}]
    if own := mtl.strategy_parameters():
        groups.append({"params": own, "lr": 0.01})
    return mtl, torch.optim.SGD(groups, lr=0.1, momentum=0.5)


def everywhere(step: int, rank: int) -> set[int]:
    return set()


def absent_somewhere(step: int, rank: int) -> set[int]:
    """Task 1 absent from rank 0's share at every step; task 2 from every share at step 1."""
    return ({1} if rank == 0 else set()) | ({2} if step == 1 else set())


def rows_of(rank: int, split: Sequence[int]) -> slice:
    return slice(sum(split[:rank]), sum(split[:rank + 1]))


def losses_of(predictions: Sequence[torch.Tensor], targets: torch.Tensor, step: int, rank: int | None,
              absent: Absence, split: Sequence[int]) -> list[torch.Tensor | None]:
    """Mean squared errors of rank ``rank``'s share (``None`` for a task absent from it), or with ``rank=None``
    what one process computes on the whole batch: the mean (over equal shares), the mean of the shares' means
    otherwise, 0 for a share without labels of the task, ``None`` for a task absent from every share."""
    losses: list[torch.Tensor | None] = []
    for task, (prediction, target) in enumerate(zip(predictions, targets)):
        errors = (prediction - target) ** 2
        if rank is not None:
            losses.append(None if task in absent(step, rank) else errors.mean())
            continue
        missing = {r for r in range(len(split)) if task in absent(step, r)}
        if len(missing) == len(split):
            losses.append(None)
        elif not missing and len(set(split)) == 1:
            losses.append(errors.mean())
        elif len(set(split)) == 1:  # a masked mean over the whole batch
            keep = torch.ones_like(errors)
            for r in missing:
                keep[rows_of(r, split)] = 0
            losses.append((errors * keep).sum() / errors.shape[0])
        else:
            means = [errors[rows_of(r, split)].mean() for r in range(len(split)) if r not in missing]
            losses.append(sum(means) / len(split))
    return losses


def train(mtl: mtlzoo.MTLWrapper, forward: Callable[[torch.Tensor], Any], optimizer: torch.optim.Optimizer,
          rank: int | None, *, split: Sequence[int] = EVEN, first: int = 0, steps: int = STEPS,
          absent: Absence = everywhere, regularise: bool = True) -> None:
    """The documented loop on rank ``rank``'s share of each batch (``None``: the whole batch): post-step losses,
    an epoch every step, a backbone loss (a regulariser of the backbone's weights, unless ``regularise=False``)."""
    dtype = next(mtl.parameters()).dtype
    rows = slice(None) if rank is None else rows_of(rank, split)
    for step in range(first, first + steps):
        x, targets = batch(seed=step, size=sum(split))
        x, targets = x[rows].to(dtype), targets[:, rows].to(dtype)
        optimizer.zero_grad()
        regulariser = 1e-3 * sum(p.square().sum() for p in mtl.backbone.parameters()) if regularise else None
        mtl.backward(losses_of(forward(x), targets, step, rank, absent, split), backbone_loss=regulariser)
        mtl.step(optimizer, post_step_losses=lambda x=x, targets=targets, step=step: losses_of(
            mtl(x), targets, step, rank, absent, split))
        mtl.end_epoch()


# ---------------------------------------------------------------------- the scenarios, run on every rank
def sweep(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Every case with each rank built from another seed (DDP and the engine make everything rank 0's)."""
    for name, target in cases:
        def run(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            train(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank)
            return mtl.state_dict()
        record(out / f"sweep-{name}-{target}-{rank}.pt", run)


def absent(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Tasks absent from some shares (:func:`absent_somewhere`)."""
    for name, target in cases:
        def run(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            train(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank, absent=absent_somewhere)
            return mtl.state_dict()
        record(out / f"absent-{name}-{target}-{rank}.pt", run)


UNEVEN = (6, 10)


def uneven(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Shares of 6 and 10 rows."""
    for name, target in cases:
        def run(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            train(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank, split=UNEVEN)
            return mtl.state_dict()
        record(out / f"uneven-{name}-{target}-{rank}.pt", run)


def accumulated(mtl: mtlzoo.MTLWrapper, forward: Any, optimizer: torch.optim.Optimizer, rank: int | None) -> None:
    """Two micro-batches per step (the second half of each share is the second): each loss halved, DDP's
    all-reduce skipped for the first (``no_sync``). One process: micro-batch j is the ranks' j-th, side by side."""
    dtype = next(mtl.parameters()).dtype
    for step in range(STEPS):
        x, targets = batch(seed=step, size=sum(EVEN))
        x, targets = x.to(dtype), targets.to(dtype)
        optimizer.zero_grad()
        for part in range(2):
            rows = [r * 8 + part * 4 + i for r in ((0, 1) if rank is None else (rank,)) for i in range(4)]
            context = forward.no_sync() if part == 0 and rank is not None else contextlib.nullcontext()
            with context:
                losses = losses_of(forward(x[rows]), targets[:, rows], step, rank, everywhere, EVEN)
                mtl.backward([loss / 2 for loss in losses])
        mtl.step(optimizer, post_step_losses=lambda x=x, targets=targets: losses_of(
            mtl(x if rank is None else x[rows_of(rank, EVEN)]), targets if rank is None else
            targets[:, rows_of(rank, EVEN)], 0, rank, everywhere, EVEN))


def accumulation(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Gradient accumulation over two micro-batches (:func:`accumulated`)."""
    for name, target in cases:
        def run(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            accumulated(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank)
            return mtl.state_dict()
        record(out / f"accumulation-{name}-{target}-{rank}.pt", run)


class Holder(nn.Module):
    """A module that holds the wrapper and is wrapped in DDP itself, as Lightning's ``ddp`` strategy does."""

    def __init__(self, mtl: mtlzoo.MTLWrapper) -> None:
        super().__init__()
        self.mtl = mtl

    def forward(self, x: torch.Tensor) -> Any:
        return self.mtl(x)


class IgnoringHolder(Holder):
    """A holder that keeps the strategy's parameters and buffers out of DDP, as docs/distributed.md says."""

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        return strategy_names(self)


def nested(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """The wrapper inside a module that DDP wraps (its strategy's parameters then go through DDP too); and inside
    one that keeps them out, with tasks absent from some shares (a task absent from every share leaves a per-task
    parameter of the strategy without a gradient, which DDP would wait for)."""
    for name, target in cases:
        def run(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            train(mtl, nn.parallel.DistributedDataParallel(Holder(mtl)), optimizer, rank)
            return mtl.state_dict()

        def ignoring(name: str = name, target: str | None = target) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            ddp = nn.parallel.DistributedDataParallel(IgnoringHolder(mtl))
            train(mtl, ddp, optimizer, rank, absent=absent_somewhere)
            return mtl.state_dict()
        record(out / f"nested-{name}-{target}-{rank}.pt", run)
        record(out / f"ignoring-{name}-{target}-{rank}.pt", ignoring)


class Attention(nn.Module):
    """Not a backbone plus heads: per-task attention over a shared trunk (the functional face's example)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.gates = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.trunk(x)
        return features, [head(features * torch.sigmoid(gate(features))) for gate, head in zip(self.gates, self.heads)]


def functional_run(name: str, target: str | None, rank: int | None, seed: int) -> dict:
    """:func:`mtlzoo.engine.backward` on :class:`Attention`, under DDP on rank ``rank`` (``None``: one process)."""
    from mtlzoo.engine import backward

    torch.manual_seed(seed)
    model = Attention()
    strategy = mtlzoo.create(name, num_tasks=3, **required_kwargs(name), **({} if target is None else
                                                                             {"target": target}))
    optimizer = torch.optim.SGD([*model.parameters(), *strategy.parameters()], lr=0.1, momentum=0.5)
    forward = model if rank is None else nn.parallel.DistributedDataParallel(model)
    rows = slice(None) if rank is None else rows_of(rank, EVEN)
    for step in range(STEPS):
        x, targets = batch(seed=step, size=sum(EVEN))
        optimizer.zero_grad()
        features, predictions = forward(x[rows])
        losses = losses_of(predictions, targets[:, rows], step, rank, everywhere, EVEN)
        backward(strategy, losses, features, model.trunk, distributed=None if rank is not None else False)
        optimizer.step()
        strategy.advance()
    return {**model.state_dict(), **{f"strategy.{key}": value for key, value in strategy.state_dict().items()}}


def functional(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """The functional face, each rank built from another seed."""
    for name, target in cases:
        record(out / f"functional-{name}-{target}-{rank}.pt",
               lambda name=name, target=target: functional_run(name, target, rank, seed=100 + rank))


def resume(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Rank 0 saves a checkpoint after 3 steps; 3 more steps, continued, or resumed from it on every rank."""
    for name, target in cases:
        checkpoint = out / f"checkpoint-{name}-{target}.pt"

        def first(name: str = name, target: str | None = target, checkpoint: Path = checkpoint) -> dict:
            mtl, optimizer = build(name, target, seed=100 + rank)
            ddp = nn.parallel.DistributedDataParallel(mtl)
            train(mtl, ddp, optimizer, rank)
            if rank == 0:
                torch.save({"model": mtl.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
            dist.barrier()
            train(mtl, ddp, optimizer, rank, first=STEPS)
            return mtl.state_dict()

        def second(name: str = name, target: str | None = target, checkpoint: Path = checkpoint) -> dict:
            mtl, optimizer = build(name, target, seed=200 + rank)
            saved = torch.load(checkpoint, weights_only=False)
            mtl.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            train(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank, first=STEPS)
            return mtl.state_dict()

        record(out / f"continued-{name}-{target}-{rank}.pt", first)
        record(out / f"resumed-{name}-{target}-{rank}.pt", second)


def refusals(rank: int, out: Path, cases: Sequence[Case]) -> None:
    """Settings the distributed path refuses, each on every rank: errors on every rank, no hang."""
    def not_in_ddp() -> None:  # the forward not through DDP: the model's gradients are never averaged
        mtl, optimizer = build("ls", None, seed=100 + rank)
        train(mtl, mtl, optimizer, rank, steps=1)

    def refused_loss() -> None:  # rank 1's loss is NaN
        mtl, _ = build("upgrad", None, seed=100)
        ddp = nn.parallel.DistributedDataParallel(mtl)
        x, targets = batch(seed=0)
        losses = losses_of(ddp(x[rows_of(rank, EVEN)]), targets[:, rows_of(rank, EVEN)], 0, rank, everywhere, EVEN)
        mtl.backward([loss * math.nan if rank == 1 else loss for loss in losses])

    def lazy() -> None:  # rotations drawn at the first training forward
        torch.manual_seed(rank)
        mtl = mtlzoo.MTLWrapper(small_model(), "rotograd")
        mtl(batch()[0])

    def batch_norm() -> list[str]:
        model = small_model()
        model.backbone.insert(1, nn.BatchNorm1d(8))
        mtl, optimizer = build("ls", None, seed=100, model=model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(mtl, nn.parallel.DistributedDataParallel(mtl), optimizer, rank, steps=1)
        return [str(warning.message) for warning in caught]

    for run in (not_in_ddp, refused_loss, lazy, batch_norm):
        record(out / f"refusals-{run.__name__}-{rank}.pt", run)


SCENARIOS = {"sweep": sweep, "absent": absent, "uneven": uneven, "accumulation": accumulation, "nested": nested,
             "functional": functional, "resume": resume, "refusals": refusals}


def record(path: Path, run: Callable[[], dict]) -> None:
    """Save what ``run`` returns, or the error it raised (a failing case fails its own test, not the launch)."""
    try:
        result: Any = run()
    except Exception:  # reported by the test of the case
        result = traceback.format_exc()
    torch.save(result, path)


def main(rank: int, world: int, out: str, plan: list[tuple[str, list[Case]]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for scenario, cases in plan:
            SCENARIOS[scenario](rank, Path(out), cases)
        dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    finally:
        gc.collect()  # DDP modules kept alive by a traceback's frames must go before their process group
        dist.destroy_process_group()


def launch(out: Path, plan: list[tuple[str, list[Case]]], world: int = 2) -> None:
    """Run ``plan`` (scenario names and their cases) on ``world`` processes."""
    torch.multiprocessing.spawn(main, args=(world, str(out), plan), nprocs=world)
