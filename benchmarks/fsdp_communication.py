"""What one step under FSDP (``fully_shard``) sends, per path: the engine's collectives and FSDP's, counted.

Run from the repository (this file is not installed with mtlzoo)::

    python benchmarks/fsdp_communication.py            # 2 processes on gloo (CPU)

The CNN of benchmarks/distributed_communication.py (K = 2 named heads on a 64-wide representation,
n = 2,480 shared parameters, 325 in the heads; 32 rows per rank), its backbone and each head sharded
with ``fully_shard``, trained 3 steps with each strategy. Counted in the steps after the first, per
rank: the numbers put into the engine's collectives (``all_reduce``, ``all_gather``, its
``reduce_scatter_single``) and into FSDP's
(``all_gather_single``: the shards gathered; ``reduce_scatter_single``: the gradients reduced into
shards). Prints a Markdown table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mtlzoo
from benchmarks.distributed_communication import STEPS, counting, label, model, spawned, train
from mtlzoo.engine.distributed import Sync

CASES: list[tuple[str, dict[str, Any]]] = [
    ("ls", {}), ("uw", {}), ("mgda", {"target": "representation"}), ("gradnorm", {"target": "representation"}),
    ("rotograd", {"rotation_shape": 64}), ("graddrop", {"target": "representation"}), ("gradnorm", {}),
    ("upgrad", {"target": "parameters"}), ("graddrop", {"target": "parameters"}),
]
KINDS = ("engine", "gather", "scatter", "engine_scatter")


def run(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("MTLZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    counts = dict.fromkeys(KINDS, 0)
    dist.all_reduce = counting(counts, "engine", dist.all_reduce, lambda tensor, *_, **__: tensor.numel())
    dist.all_gather = counting(counts, "engine", dist.all_gather, lambda outputs, tensor, *_, **__: tensor.numel())
    def sent(*args: Any, **kwargs: Any) -> int:
        return (args[1] if len(args) > 1 else kwargs["input"]).numel()
    dist.all_gather_single = counting(counts, "gather", dist.all_gather_single, sent)
    dist.reduce_scatter_single = counting(counts, "scatter", dist.reduce_scatter_single, sent)
    Sync._reduce_scatter = counting(counts, "engine_scatter", Sync._reduce_scatter, lambda sync, tensor: tensor.numel())
    rows = []
    for name, options in CASES:
        torch.manual_seed(0)
        mtl = mtlzoo.MTLWrapper(model(), name, **mtlzoo.get_strategy(name).info.suggested, **options)
        for part in (mtl.backbone, *mtl.heads.values()):
            fully_shard(part)
        train(mtl, mtl, rank, lambda: counts.update(dict.fromkeys(KINDS, 0)))
        engine, gather, scatter, engine_scatter = (counts[kind] // (STEPS - 1) for kind in KINDS)
        rows.append((label(name, options), engine + engine_scatter, gather, scatter - engine_scatter))
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    dist.destroy_process_group()


def main() -> None:
    world = 2
    rows = spawned(run, world)
    print(f"| strategy (W = {world}) | the engine's collectives | FSDP's all-gathers (shards sent) | "
          "FSDP's reduce-scatters (gradients sent) |")
    print("| --- | ---: | ---: | ---: |")
    for row_label, engine, gather, scatter in rows:
        print(f"| `{row_label}` | {engine:,} | {gather:,} | {scatter:,} |")


if __name__ == "__main__":
    main()
