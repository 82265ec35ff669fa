"""The internal plugin that registers the built-in problems, through the hook a third party implements."""

from __future__ import annotations

from collections.abc import Callable

from mtlzoo.harness.problems.benchmarks import BENCHMARK_PROBLEMS
from mtlzoo.harness.problems.gradnorm_synthetic import GradNormSynthetic
from mtlzoo.harness.problems.mixedscale import MixedScale
from mtlzoo.harness.problems.multidigits import MultiDigits
from mtlzoo.harness.problems.toy2d import Toy2D
from mtlzoo.hookspecs import hookimpl

BUILTIN_PROBLEMS = (Toy2D, GradNormSynthetic, MultiDigits, MixedScale)


@hookimpl
def mtlzoo_register_problems(register: Callable[[type], None]) -> None:
    for cls in (*BUILTIN_PROBLEMS, *BENCHMARK_PROBLEMS):
        register(cls)
