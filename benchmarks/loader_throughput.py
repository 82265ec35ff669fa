"""The benchmarks' loaders, timed on generated data at the real sizes: samples per second of one training epoch.

    python benchmarks/loader_throughput.py [--workers 0,2] [--out FILE]

NYUv2 at 288 x 384 (MTAN's arrays, with the scale-crop and flip augmentation), CelebA's 178 x 218 JPEGs
decoded and resized to 64 x 64, QM9's molecules collated by torch_geometric. The data sets are small
(a few hundred samples), generated in a temporary folder; the figure is the loader's alone (no model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlzoo.harness.problems.celeba import CelebA
from mtlzoo.harness.problems.nyuv2 import NYUv2
from mtlzoo.harness.problems.qm9 import QM9
from tests.harness.benchmarks import datasets


def samples_per_second(problem, batches: int) -> float:
    loader = problem.epoch(torch.Generator().manual_seed(0))
    next(loader)  # the workers' start-up is not counted
    seen, start = 0, time.perf_counter()
    for _, (x, _) in zip(range(batches), loader):
        seen += x.num_graphs if hasattr(x, "num_graphs") else len(x)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the harness runs (RunConfig.threads); workers use one thread each anyway
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        made = {
            "nyuv2": (lambda w: NYUv2(data=str(datasets.write_nyuv2(root / "nyuv2", sizes=(64, 2), height=288,
                                                                       width=384)), workers=w), 30),
            "celeba": (lambda w: CelebA(data=str(datasets.write_celeba(root / "celeba", sizes=(1024, 2, 2))),
                                        workers=w), 3),
            "qm9": (lambda w: QM9(data=str(datasets.write_qm9(root / "qm9", molecules=3000)), workers=w,
                                  test_size=10, val_size=10), 20),
        }
        for name, (make, batches) in made.items():
            problem = None
            for workers in (int(w) for w in args.workers.split(",")):
                problem = make(workers) if problem is None else type(problem)(**{**problem.settings,
                                                                                  "workers": workers})
                rate = samples_per_second(problem, batches)
                report[f"{name} workers={workers}"] = round(rate, 1)
                print(f"{name:8} workers={workers}: {rate:8.1f} samples/s (batch {problem.batch_size})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
