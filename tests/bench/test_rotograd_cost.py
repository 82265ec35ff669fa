"""RotoGrad's step cost against its floor (issue 12), all in one process: ``pytest -m bench -s -n0 <this file>``.

Reference MLP: input 64, backbone 64-256-256-d, K linear heads, batch 256, MSE, SGD. For each d the
configurations run interleaved, one step each per round (after warm-up), timed with
``time.thread_time`` on one torch thread (the CPU time of this thread, little disturbed by other
jobs on the machine); every figure is a ratio to the plain step of the same round, reported as the
median and quartiles over the rounds:

- ``plain``: summed-loss training, ``sum_k L_k`` backward, SGD step (1.00 by definition);
- ``floor``: ``plain`` plus the K rotations with precomputed matrices: ``z R_k^T`` in the forward,
  ``dz`` and ``dR_k`` in the backward (what any RotoGrad must at least do);
- ``floor, one bmm``: the same with the K rotations as one batched product of a (K, B, d) stack;
- ``W_k R_k``: the structural trick for linear heads, ``z (W_k R_k)^T`` with ``W_k R_k`` formed
  once per step (m d^2 instead of B d^2), below the floor;
- mtlzoo's ``rotograd`` with each ``orthogonal_map`` (its linear heads folded, ``W_k R_k``, the default),
  the retraction also unfolded (``fold_linear_heads=False``: the batch rotated), and the original
  ``rotograd`` 0.1.6.0 package (the ``reference`` extra) when installed.

It checks only that every configuration trains (finite losses); targets are read from the table.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.strategies._rotation_bank import ORTHOGONAL_MAPS, haar_rotations

pytestmark = pytest.mark.bench
SIZES = (128, 512)
NUM_TASKS = 4
BATCH = 256
ROUNDS = 30


def reference_model(size: int, num_tasks: int = NUM_TASKS) -> tuple[nn.Module, list[nn.Module]]:
    backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, size))
    return backbone, [nn.Linear(size, 1) for _ in range(num_tasks)]


def mse(predictions: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    return [((p - t) ** 2).mean() for p, t in zip(predictions, targets)]


def step_functions(size: int, num_tasks: int = NUM_TASKS, batch: int = BATCH,
                   maps: tuple[str, ...] = ORTHOGONAL_MAPS) -> dict[str, Callable[[], float]]:
    """One training step per configuration, each on its own copy of the same model."""
    torch.manual_seed(0)
    backbone, heads = reference_model(size, num_tasks)
    x, targets = torch.randn(batch, 64), torch.randn(num_tasks, batch, 1)
    rotations = haar_rotations(num_tasks, size)
    steps: dict[str, Callable[[], float]] = {}

    def plain() -> Callable[[], float]:
        b, h = copy.deepcopy(backbone), copy.deepcopy(heads)
        optimizer = torch.optim.SGD([*b.parameters(), *(p for m in h for p in m.parameters())], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            z = b(x)
            loss = sum(mse([head(z) for head in h], targets))
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return step

    def floor(batched: bool) -> Callable[[], float]:
        b, h = copy.deepcopy(backbone), copy.deepcopy(heads)
        matrices = [r.clone().requires_grad_() for r in rotations]
        stacked = rotations.clone().requires_grad_()
        optimizer = torch.optim.SGD([*b.parameters(), *(p for m in h for p in m.parameters())], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            matrices[0].grad = stacked.grad = None
            z = b(x)
            if batched:
                rotated = torch.bmm(z.expand(num_tasks, -1, -1), stacked.mT)
                predictions = [head(rotated[k]) for k, head in enumerate(h)]
            else:
                predictions = [head(z @ r.mT) for head, r in zip(h, matrices)]
            loss = sum(mse(predictions, targets))
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return step

    def fused_heads() -> Callable[[], float]:
        b, h = copy.deepcopy(backbone), copy.deepcopy(heads)
        stacked = rotations.clone().requires_grad_()
        optimizer = torch.optim.SGD([*b.parameters(), *(p for m in h for p in m.parameters())], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            stacked.grad = None
            z = b(x)
            predictions = [nn.functional.linear(z, head.weight @ stacked[k], head.bias) for k, head in enumerate(h)]
            loss = sum(mse(predictions, targets))
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return step

    def ours(orthogonal_map: str, fold: bool = True) -> Callable[[], float]:
        model = mtlzoo.HardSharing(copy.deepcopy(backbone), copy.deepcopy(heads))
        mtl = mtlzoo.MTLWrapper(model, "rotograd", rotation_shape=size, orthogonal_map=orthogonal_map,
                                fold_linear_heads=fold)
        mtl.strategy.rotations = rotations
        optimizer = torch.optim.SGD([{"params": list(mtl.model_parameters())},
                                     {"params": mtl.strategy_parameters(), "lr": 1e-4}], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            with mtlzoo.cached():
                losses = mse(mtl(x), targets)
                mtl.backward(losses)
            mtl.step(optimizer)
            return float(sum(loss.detach() for loss in losses))
        return step

    def original() -> Callable[[], float] | None:
        try:
            import rotograd  # the `reference` extra
        except ImportError:
            return None
        b, h = copy.deepcopy(backbone), copy.deepcopy(heads)
        model = rotograd.RotoGrad(b, h, size)
        for k in range(num_tasks):
            setattr(model, f"rotation_{k}", rotations[k].clone())
        optimizer = torch.optim.SGD([{"params": list(model.model_parameters())},
                                     {"params": list(model.mtl_parameters()), "lr": 1e-4}], lr=1e-3)

        def step() -> float:
            optimizer.zero_grad()
            with rotograd.cached():
                losses = mse(model(x), targets)
                model.backward(losses)
            optimizer.step()
            return float(sum(loss.detach() for loss in losses))
        return step

    steps["plain"] = plain()
    steps["floor"] = floor(batched=False)
    steps["floor, one bmm"] = floor(batched=True)
    steps["W_k R_k (linear heads)"] = fused_heads()
    for orthogonal_map in maps:
        steps[f"mtlzoo rotograd {orthogonal_map}"] = ours(orthogonal_map)
    if "retraction" in maps:
        steps["mtlzoo rotograd retraction, unfolded"] = ours("retraction", fold=False)
    reference = original()
    if reference is not None:
        steps["rotograd 0.1.6.0"] = reference
    return steps


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ratios_to_plain(steps: dict[str, Callable[[], float]], rounds: int = ROUNDS,
                    warmup: int = 3) -> dict[str, list[float]]:
    """Per round, each configuration's step time (thread CPU time) over the plain step's in that round."""
    for step in steps.values():
        for _ in range(warmup):
            assert torch.isfinite(torch.tensor(step()))
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        seconds = {}
        for name, step in steps.items():
            start = time.thread_time()
            loss = step()
            seconds[name] = time.thread_time() - start
            assert torch.isfinite(torch.tensor(loss)), name
        for name in steps:
            ratios[name].append(seconds[name] / seconds["plain"])
    return ratios


def summary(values: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return f"{median:6.2f} [{q1:5.2f}, {q3:5.2f}]"


def test_rotograd_step_against_its_floor() -> None:
    with one_thread():
        print(f"\nStep time / plain step time (thread CPU time, 1 torch thread, torch {torch.__version__}), "
              f"K={NUM_TASKS}, B={BATCH}, median [quartiles] over {ROUNDS} interleaved rounds")
        for size in SIZES:
            ratios = ratios_to_plain(step_functions(size))
            print(f"d = {size}: ratio to plain, median [quartiles]; ratio to the floor (paired by round)")
            for name, values in ratios.items():
                print(f"  {name:<28} {summary(values)}   / floor {summary(to_floor(values, ratios['floor']))}")


def to_floor(values: list[float], floor: list[float]) -> list[float]:
    """Per round, a configuration's time over the floor's in the same round."""
    return [value / reference for value, reference in zip(values, floor)]
