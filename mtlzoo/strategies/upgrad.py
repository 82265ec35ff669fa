r"""UPGrad (Quinton & Rey, 2024): the mean of every task gradient projected onto the dual cone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.solvers import clean_gramian, dual_cone_weights, unit_trace
from mtlzoo.strategies._weighting import per_task_numbers
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_number

JD_PAPER = Paper(
    authors=("Pierre Quinton", "Valérian Rey"), title="Jacobian descent for multi-objective optimization",
    venue="arXiv", year=2024, url="https://arxiv.org/abs/2406.16232",
)


def preference(values: Sequence[float] | Tensor | None, num_tasks: int) -> Tensor | None:
    """A checked preference vector (K non-negative finite numbers), or ``None`` for the mean."""
    if values is None:
        return None
    return per_task_numbers(values, "pref_vector", num_tasks, non_negative=True).to(torch.float64).detach().clone()


class DualConeSurgery(GramianAggregator):
    """What UPGrad and DualProj share: an optional preference vector over the tasks and a Gramian
    regularisation ``reg_eps``, and the properties those settings break."""

    per_task = ("pref_vector",)
    regularization_breaks: frozenset[str] = frozenset()
    """The claims a ``reg_eps > 0`` gives up."""

    def __init__(self, num_tasks: int, *, target: Target | None = None,
                 pref_vector: Sequence[float] | Tensor | None = None, reg_eps: float = 0.0) -> None:
        super().__init__(num_tasks, target=target)
        self.pref_vector = preference(pref_vector, num_tasks)
        self.reg_eps = check_number("reg_eps", reg_eps)

    def problem(self, gramian: np.ndarray, step: HostStep) -> tuple[np.ndarray, np.ndarray]:
        """The Gramian the projections are solved on (``G / tr(G) + reg_eps I``, made positive semi-definite on
        the rows' own scales by :func:`mtlzoo.solvers.clean_gramian`) and the preference of the present tasks
        (``1/K'`` each, or the given entries)."""
        size = gramian.shape[0]
        if self.pref_vector is None:
            weights = np.full(size, 1.0 / size) if size else np.zeros(0)
        else:
            weights = self.pref_vector.numpy()[step.tasks]
        return clean_gramian(unit_trace(gramian, self.reg_eps), step.eps), weights

    @property
    def properties(self) -> frozenset[str]:
        return super().properties - (self.regularization_breaks if self.reg_eps > 0 else frozenset())


class UPGrad(DualConeSurgery):
    r"""UPGrad: project each task gradient onto the dual cone of all of them, and average.

    Paper: Quinton & Rey, *Jacobian descent for multi-objective optimization*, 2024
    (https://arxiv.org/abs/2406.16232), eq. 5 and Prop. 1. With ``π_J`` the projection onto the
    dual cone ``{d : J d >= 0}`` and ``p`` the preference vector (``1/K`` each by default):

    .. math::

        d = \sum_k p_k\, \pi_J(g_k) = J^\top \sum_k v^{(k)},
        \qquad v^{(k)} = \arg\min_{v \ge p_k e_k} v^\top G v .

    ``d`` conflicts with no task (``J d >= 0``), is zero at a Pareto-stationary point (a positive combination of the
    rows is zero), scales with the gradients, and is linear under a per-task scaling of the rows. The K quadratic
    programs are solved exactly on the Gramian (:func:`mtlzoo.solvers.project_to_dual_cone`), in float64 on the host.

    Differences from torchjd 0.18's ``UPGrad`` (written by the paper's authors): torchjd solves on ``G / tr(G) + 1e-4
    I`` and treats a Gramian of trace below ``1e-4`` as zero (then it returns the plain mean of the rows); here the
    Gramian is scaled to unit trace whatever its size, and ``reg_eps`` (default 0: the paper's exact projection) adds
    ``reg_eps I`` after that scaling. With ``reg_eps=1e-4`` the two agree to rounding on gradients of trace above 1e-4;
    with the default they differ by the regularisation's effect, up to a few percent of ``||J||`` on ill-conditioned or
    rank-deficient Jacobians.

    Args:
        pref_vector: K non-negative weights of the projected gradients; ``None`` for ``1/K'``
            each over the K' tasks present in the step.
        reg_eps: ``eps`` of ``G / tr(G) + eps I`` (0: exact projections).

    Example:
        >>> import torch, mtlzoo
        >>> upgrad = mtlzoo.create("upgrad", num_tasks=2)
        >>> upgrad.aggregate(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.ones(2))
        tensor([0.2500, 0.7500])
    """

    info = StrategyInfo(
        name="upgrad",
        summary="Mean of the task gradients, each projected onto the dual cone of all of them (Jacobian descent).",
        request=Request("parameters", "gramian"), paper=JD_PAPER,
        properties=frozenset(
            {"non_conflicting", "permutation_invariant", "scale_linear", "stationary", "linear_under_scaling"}),
        cost="parameters", original_code="https://github.com/TorchJD/torchjd",
    )

    regularization_breaks = frozenset({"non_conflicting", "linear_under_scaling"})

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        unit, weights = self.problem(gramian, step)
        return dual_cone_weights(np.diag(weights), unit).sum(0)  # project_to_dual_cone's solver, on the host
