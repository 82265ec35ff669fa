"""Regenerate the data and images of the comparison guide and the performance page.

Run from the repository's root, with the ``plot`` extra installed::

    python docs/make_figures.py                      # all built-in strategies, the default problems and scale
    python docs/make_figures.py --strategies default # only the default comparison's strategies (faster)
    python docs/make_figures.py --steps 400 --seeds 5 --skip-bench
    python docs/make_figures.py --out runs-dir --resume  # continue an interrupted regeneration
    python docs/make_figures.py --skip-compare --skip-bench  # only the suite against rotograd / torchjd and growth

It runs ``mtlzoo compare --out DIR`` (the built-in strategies only: third-party autoload is off)
and copies ``results.json``, ``results.csv`` and the PNG plots into ``docs/comparison/``; then
``mtlzoo bench --out docs/performance/bench.json``; then the benchmark against the reference
implementations, which is not installed with mtlzoo: ``python benchmarks/vs_reference.py --out
docs/performance/reference.json`` and ``python benchmarks/vs_reference.py --growth --out
docs/performance/growth.json --plot docs/performance``. Every command runs this checkout's mtlzoo.
The site reads their output at build time, so building it needs no training. Commit what changed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
COMPARISON = DOCS / "comparison"
ROOT = DOCS.parent
VS_REFERENCE = ROOT / "benchmarks" / "vs_reference.py"
BENCH = DOCS / "performance" / "bench.json"
REFERENCE = DOCS / "performance" / "reference.json"
GROWTH = DOCS / "performance" / "growth.json"


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's mtlzoo
    subprocess.run(command, check=True, env={**os.environ, "MTLZOO_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": path})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="all",
                        help="passed to `mtlzoo compare --strategies` ('default' for its default set; default: all)")
    parser.add_argument("--steps", help="passed to `mtlzoo compare --steps` (default: each problem's default)")
    parser.add_argument("--seeds", help="passed to `mtlzoo compare --seeds` (default: each problem's default)")
    parser.add_argument("--problem", help="passed to `mtlzoo compare --problem` (default: the default problems)")
    parser.add_argument("--out", help="keep `mtlzoo compare`'s runs in this folder (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="with --out: reuse its finished runs")
    parser.add_argument("--skip-compare", action="store_true", help="keep the committed comparison")
    parser.add_argument("--skip-bench", action="store_true", help="keep the committed benchmark")
    parser.add_argument("--skip-reference", action="store_true",
                        help="keep the committed suite against rotograd and torchjd (reference.json)")
    parser.add_argument("--skip-growth", action="store_true", help="keep the committed growth figures")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="passed to `benchmarks/vs_reference.py [--growth] --clock` (default: cpu)")
    args = parser.parse_args(argv)

    mtlzoo = [sys.executable, "-m", "mtlzoo"]
    if not args.skip_compare:
        with tempfile.TemporaryDirectory(prefix="mtlzoo-docs-") as temporary:
            out = args.out or temporary
            command = [*mtlzoo, "compare", "--out", out] + (["--resume"] if args.resume else [])
            if args.strategies != "default":
                command += ["--strategies", args.strategies]
            for option in ("steps", "seeds", "problem"):
                if getattr(args, option):
                    command += [f"--{option}", getattr(args, option)]
            run(command)
            COMPARISON.mkdir(parents=True, exist_ok=True)
            for old in COMPARISON.glob("*.png"):
                old.unlink()
            for name in ["results.json", "results.csv", *sorted(p.name for p in Path(out).glob("*.png"))]:
                shutil.copy(Path(out) / name, COMPARISON / name)
                print("wrote", (COMPARISON / name).relative_to(DOCS.parent))
    if not args.skip_bench:
        BENCH.parent.mkdir(parents=True, exist_ok=True)
        run([*mtlzoo, "bench", "--strategies", "all", "--out", str(BENCH)])
        print("wrote", BENCH.relative_to(DOCS.parent))
    if not args.skip_reference:
        run([sys.executable, str(VS_REFERENCE), "--clock", args.clock, "--out", str(REFERENCE)])
        print("wrote", REFERENCE.relative_to(DOCS.parent))
    if not args.skip_growth:
        run([sys.executable, str(VS_REFERENCE), "--growth", "--clock", args.clock, "--out", str(GROWTH), "--plot",
             str(GROWTH.parent)])
        print("wrote", GROWTH.relative_to(DOCS.parent), "and its growth_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
