"""Measurement behind RotoGrad's default `orthogonal_map` (run with `pytest -m bench -s`).

Reports the time of one RotoGrad training step with each orthogonal map as a ratio to one
plain summed-loss (`ls`) step on the same model, all taken in one run. It checks only that
every configuration trains; the ratios are printed for the reader.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import mtlzoo
from mtlzoo.strategies._rotation_bank import ORTHOGONAL_MAPS

pytestmark = pytest.mark.bench
SIZES = (16, 64, 256)
NUM_TASKS = 3


def step_seconds(strategy: str, size: int, repeats: int = 5, steps: int = 10, **kwargs: object) -> float:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, size))
    heads = [nn.Sequential(nn.Linear(size, 64), nn.ReLU(), nn.Linear(64, 1)) for _ in range(NUM_TASKS)]
    mtl = mtlzoo.MTLWrapper(mtlzoo.HardSharing(backbone, heads), strategy, **kwargs)
    groups = [{"params": list(mtl.model_parameters())}, {"params": mtl.strategy_parameters(), "lr": 1e-4}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=1e-3)
    x, y = torch.randn(128, 32), torch.randn(NUM_TASKS, 128, 1)

    def step() -> float:
        optimizer.zero_grad()
        with mtlzoo.cached():
            losses = [((p - t) ** 2).mean() for p, t in zip(mtl(x), y)]
            mtl.backward(losses)
        optimizer.step()
        return float(sum(losses).detach())

    step()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        timings.append((time.perf_counter() - start) / steps)
    assert torch.isfinite(torch.tensor(loss))
    return statistics.median(timings)


def test_rotograd_step_cost_by_orthogonal_map() -> None:
    print(f"\nRotoGrad step time / ls step time, K={NUM_TASKS}, batch 128, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("n     " + "  ".join(f"{m:>12}" for m in ORTHOGONAL_MAPS))
    for size in SIZES:
        baseline = step_seconds("ls", size)
        ratios = [step_seconds("rotograd", size, rotation_shape=size, orthogonal_map=m) / baseline
                  for m in ORTHOGONAL_MAPS]
        print(f"{size:<6}" + "  ".join(f"{r:>12.2f}" for r in ratios))
