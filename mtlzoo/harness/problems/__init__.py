"""The problems on which strategies are compared: what a problem is (:mod:`~mtlzoo.harness.problems.base`), the
built-ins, and their registry (:mod:`~mtlzoo.harness.problems.registry`)."""

from __future__ import annotations

from mtlzoo.harness.problems.base import Metric, Problem, check_metrics
from mtlzoo.harness.problems.builtin import BUILTIN_PROBLEMS
from mtlzoo.harness.problems.gradnorm_synthetic import GradNormSynthetic
from mtlzoo.harness.problems.mixedscale import MixedScale
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

__all__ = ["BUILTIN_PROBLEMS", "PROBLEMS", "GradNormSynthetic", "Metric", "MixedScale", "MultiDigits", "Problem",
           "ProblemEntry", "RotoGradToy", "Toy2D", "check_metrics", "create_problem", "default_problems", "get_problem",
           "list_problems", "register_problem"]
