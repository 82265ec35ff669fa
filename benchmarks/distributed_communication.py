"""What one data-parallel step sends, per path: the engine's collectives and DDP's all-reduce, counted.

Run from the repository (this file is not installed with mtlzoo)::

    python benchmarks/distributed_communication.py            # 2 processes on gloo (CPU)

It trains the CNN of docs/examples/train_distributed.py (K = 2 named heads on a 64-wide
representation, n = 2,480 shared parameters, 325 in the heads; 32 rows per rank) for 3 steps
with each strategy under ``DistributedDataParallel``, and counts, in the steps after the first,
the numbers each rank puts into a collective: the engine's (``torch.distributed.all_reduce`` and
``all_gather``, wrapped here to count their inputs) and DDP's (a communication hook that counts
its buckets). The first step also broadcasts the strategy's state once; it is not counted.
Prints a Markdown table: numbers per rank and step, and what they are.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.functional import cross_entropy, mse_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mtlzoo

CASES: list[tuple[str, dict[str, Any], str]] = [
    ("ls", {}, "the losses: 2K + 3"),
    ("uw", {}, "the losses: 2K + 3"),
    ("mgda", {"target": "representation"}, "losses; the Gramian on z: K x K"),
    ("gradnorm", {"target": "representation"}, "losses; the norms on z: K"),
    ("rotograd", {"rotation_shape": 64}, "losses; the gradients on z gathered: K x B_r x d (+ W counts)"),
    ("graddrop", {"target": "representation"}, "losses; gradients and z gathered: (K + 1) x B_r x d (+ W)"),
    ("gradnorm", {}, "losses; the Jacobian of the last layer: K x n_layer"),
    ("upgrad", {"target": "parameters"}, "losses; the Jacobian: K x n"),
    ("graddrop", {"target": "parameters"}, "losses; the Jacobian: K x n"),
]
STEPS = 3


def model() -> mtlzoo.HardSharing:
    backbone = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return mtlzoo.HardSharing(backbone, {"quadrant": nn.Linear(64, 4), "contrast": nn.Linear(64, 1)})


def counting(counts: dict[str, int], kind: str, function: Callable[..., Any],
             size: Callable[..., int]) -> Callable[..., Any]:
    """``function``, which now adds ``size(*its arguments)`` to ``counts[kind]`` at each call."""
    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[kind] += size(*args, **kwargs)
        return function(*args, **kwargs)
    return counted


def run(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("MTLZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counts = {"engine": 0, "ddp": 0}
    dist.all_reduce = counting(counts, "engine", dist.all_reduce, lambda tensor, *_, **__: tensor.numel())
    dist.all_gather = counting(counts, "engine", dist.all_gather, lambda outputs, tensor, *_, **__: tensor.numel())
    rows = []
    for name, options, what in CASES:
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(model(), name, **mtlzoo.get_strategy(name).info.suggested, **options)
        ddp = nn.parallel.DistributedDataParallel(mtl)
        ddp.register_comm_hook(counts, lambda state, bucket: (state.__setitem__(
            "ddp", state["ddp"] + bucket.buffer().numel()), allreduce_hook(None, bucket))[1])
        train(mtl, ddp, rank, lambda: counts.update(engine=0, ddp=0))
        engine = counts["engine"] - counts["ddp"]  # DDP's hook calls all_reduce too
        rows.append((label(name, options), engine // (STEPS - 1), counts["ddp"] // (STEPS - 1), what))
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    dist.destroy_process_group()


def train(mtl: mtlzoo.MTLWrapper, forward: Callable[[Tensor], Any], rank: int, restart: Callable[[], Any]) -> None:
    """``STEPS`` steps of the two tasks on this rank's random batches; ``restart()`` before the second (the counts
    leave out the first step, which broadcasts the strategy's state)."""
    optimizer = torch.optim.SGD(mtl.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        if step == 1:
            restart()
        x = torch.randn(32, 1, 16, 16, generator=generator)
        predictions = forward(x)
        mtl.backward({"quadrant": cross_entropy(predictions["quadrant"], torch.randint(0, 4, (32,))),
                      "contrast": mse_loss(predictions["contrast"].squeeze(1), x.std((1, 2, 3)))})
        mtl.step(optimizer)


def label(name: str, options: dict[str, Any]) -> str:
    return f"{name}" + "".join(f", {key}={value}" for key, value in options.items() if key == "target")


def spawned(run: Callable[..., None], world: int = 2) -> list[tuple[Any, ...]]:
    """The rows that ``run(rank, world, store, out)`` saves on rank 0, run on ``world`` processes."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "rows.pt")
        torch.multiprocessing.spawn(run, args=(world, os.path.join(directory, "store"), out), nprocs=world)
        return torch.load(out)


def main() -> None:
    world = 2
    rows = spawned(run, world)
    print(f"| strategy | engine, numbers per rank and step | DDP's all-reduce | what the engine sends (W = {world}) |")
    print("| --- | ---: | ---: | --- |")
    for row_label, engine, ddp, what in rows:
        print(f"| `{row_label}` | {engine:,} | {ddp:,} | {what} |")


if __name__ == "__main__":
    main()
