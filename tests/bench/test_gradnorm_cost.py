"""GradNorm's step cost against `ls` on the reference MLP (run with `pytest -m bench -s`).

The model of the speed issue: input 64, backbone 64-256-256-128 (its last layer linear), 4 linear
heads, batch 256, MSE, SGD. Steps of `ls`, `gradnorm` (norms on the last shared layer, the
paper's choice), `gradnorm` with `target="representation"` and, for scale, a hand-written step of
the product route (per-task gradients on z by one head backward, the norms on W from the K products
h^T G_k, one backbone backward) are interleaved after a warm-up; mtlzoo goes below that step
because its linear heads let the norms factor through them (``||V_k^T (D_k^T h)||``); each step's time is divided by the
`ls` step next to it, and the median and quartiles of those ratios are printed, by wall clock
and by this thread's CPU time (less disturbed by other processes on a shared machine). It checks
only that every configuration trains.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

import mtlzoo

pytestmark = pytest.mark.bench
NUM_TASKS, BATCH, STEPS, WARMUP = 4, 256, 300, 20


def reference_mlp() -> mtlzoo.HardSharing:
    backbone = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    return mtlzoo.HardSharing(backbone, [nn.Linear(128, 1) for _ in range(NUM_TASKS)])


def wrapped_step(strategy: str, **kwargs: object) -> Callable[[], float]:
    torch.manual_seed(0)
    mtl = mtlzoo.MTLWrapper(reference_mlp(), strategy, **kwargs)
    groups = [{"params": list(mtl.model_parameters())}]
    if own := mtl.strategy_parameters():
        groups.append({"params": own, "lr": 1e-3})
    optimizer = torch.optim.SGD(groups, lr=1e-3)
    x, y = torch.randn(BATCH, 64), torch.randn(NUM_TASKS, BATCH, 1)

    def step() -> float:
        optimizer.zero_grad()
        losses = [nn.functional.mse_loss(p, t) for p, t in zip(mtl(x), y)]
        mtl.backward(losses)
        mtl.step(optimizer)
        return float(sum(losses).detach())

    return step


def floor_step() -> Callable[[], float]:
    """By hand: GradNorm's norms from the K products h^T G_k (what a model without linear heads needs)."""
    torch.manual_seed(0)
    model = reference_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH, 64), torch.randn(NUM_TASKS, BATCH, 1)
    heads = list(model.heads)

    def step() -> float:
        optimizer.zero_grad()
        z = model.backbone(x)
        leaves = [z.detach().requires_grad_() for _ in heads]
        losses = torch.stack([nn.functional.mse_loss(h(leaf), t) for h, leaf, t in zip(heads, leaves, y)])
        head_params = [p for h in heads for p in h.parameters()]
        grads = torch.autograd.grad(losses.sum(), leaves + head_params)
        per_task = torch.stack(grads[:NUM_TASKS])
        with torch.no_grad():
            norms = torch.matmul(z.grad_fn._saved_mat1.T.contiguous(), per_task).flatten(1).norm(dim=1)
        torch.autograd.backward([z, *head_params], [per_task.sum(0), *grads[NUM_TASKS:]])
        optimizer.step()
        return float(losses.sum().detach() + 0 * norms.sum())

    return step


def test_gradnorm_step_cost_against_ls() -> None:
    configs = {"ls": wrapped_step("ls"), "gradnorm": wrapped_step("gradnorm", alpha=1.5),
               "gradnorm (representation)": wrapped_step("gradnorm", alpha=1.5, target="representation"),
               "hand-written product route": floor_step()}
    for step in configs.values():
        for _ in range(WARMUP):
            step()
    wall: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(STEPS):
        for name, step in configs.items():
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            loss = step()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
            assert torch.isfinite(torch.tensor(loss))
    print(f"\nstep time / ls step time, reference MLP (64-256-256-128, K={NUM_TASKS}, batch {BATCH}, SGD), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median [quartiles] of {STEPS} paired steps")
    print(f"ls step: {statistics.median(wall['ls']) * 1e3:.2f} ms wall, "
          f"{statistics.median(cpu['ls']) * 1e3:.2f} ms CPU")
    for name in configs:
        line = f"{name:28s}"
        for label, times in (("wall", wall), ("cpu", cpu)):
            ratios = sorted(a / b for a, b in zip(times[name], times["ls"]) if b > 0)
            q1, q2, q3 = (ratios[int(len(ratios) * q)] for q in (0.25, 0.5, 0.75))
            line += f"  {label} {q2:.2f}x [{q1:.2f}, {q3:.2f}]"
        print(line)
