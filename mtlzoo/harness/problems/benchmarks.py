"""The standard benchmarks of the literature, read from a local folder (``--data PATH``): built-ins that join no
default comparison (each needs its data set, and hours of a GPU at full scale)."""

from __future__ import annotations

from mtlzoo.harness.problems.celeba import CelebA
from mtlzoo.harness.problems.cityscapes import Cityscapes
from mtlzoo.harness.problems.nyuv2 import NYUv2
from mtlzoo.harness.problems.qm9 import QM9

BENCHMARK_PROBLEMS = (NYUv2, Cityscapes, CelebA, QM9)
