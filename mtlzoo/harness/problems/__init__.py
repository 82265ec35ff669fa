"""Built-in problems on which strategies are compared, and the internal plugin that registers them.

Every problem generates its data itself (``multidigits`` reads the digits scikit-learn ships, the
``digits`` extra). A plugin adds problems through the hook ``mtlzoo_register_problems``, as this
module does for the built-ins; :func:`list_problems` and :func:`create_problem` see them all.
"""

from __future__ import annotations

from collections.abc import Callable

from mtlzoo.harness.problems.base import Metric, Problem, check_metrics
from mtlzoo.harness.problems.gradnorm_synthetic import GradNormSynthetic
from mtlzoo.harness.problems.multidigits import MultiDigits
from mtlzoo.harness.problems.registry import (
    PROBLEMS,
    ProblemEntry,
    create_problem,
    default_problems,
    get_problem,
    list_problems,
    register_problem,
)
from mtlzoo.harness.problems.toy2d import RotoGradToy, Toy2D
from mtlzoo.hookspecs import hookimpl

BUILTIN_PROBLEMS = (Toy2D, GradNormSynthetic, MultiDigits)

__all__ = [
    "BUILTIN_PROBLEMS",
    "PROBLEMS",
    "GradNormSynthetic",
    "Metric",
    "MultiDigits",
    "Problem",
    "ProblemEntry",
    "RotoGradToy",
    "Toy2D",
    "check_metrics",
    "create_problem",
    "default_problems",
    "get_problem",
    "list_problems",
    "register_problem",
]


@hookimpl
def mtlzoo_register_problems(register: Callable[[type], None]) -> None:
    for cls in BUILTIN_PROBLEMS:
        register(cls)
