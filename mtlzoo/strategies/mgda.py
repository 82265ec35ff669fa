r"""MGDA and MGDA-UB (Sener & Koltun, NeurIPS 2018): the minimum-norm point of the task gradients' hull."""

from __future__ import annotations

from typing import Literal

import numpy as np

from mtlzoo.protocol import Request
from mtlzoo.roles import GramianAggregator, HostStep
from mtlzoo.roles.modifiers import normalized
from mtlzoo.solvers import clean_gramian, min_norm_weights
from mtlzoo.strategy import Paper, StrategyInfo, Target, check_flag

MGDA_PAPER = Paper(
    authors=("Ozan Sener", "Vladlen Koltun"), title="Multi-Task Learning as Multi-Objective Optimization",
    venue="NeurIPS", year=2018, url="https://arxiv.org/abs/1810.04650",
)
Normalization = Literal["none", "l2", "loss", "loss+"]
NORMALIZATIONS: tuple[Normalization, ...] = ("none", "l2", "loss", "loss+")


class MGDA(GramianAggregator):
    r"""MGDA: the update is the minimum-norm point of the convex hull of the task gradients.

    Paper: Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018
    (https://arxiv.org/abs/1810.04650), after Désidéri's multiple-gradient descent algorithm:

    .. math::

        c = \arg\min_{c \ge 0,\ \sum_k c_k = 1} \Big\| \sum_k c_k g_k \Big\|^2 = \arg\min c^\top G c,
        \qquad d = \sum_k c_k g_k .

    ``d`` has a non-negative inner product with every ``g_k`` (``d . g_k >= ||d||^2``), and is zero exactly when a
    convex combination of the gradients is zero (a Pareto-stationary point): where ``||d||^2`` is within the rounding of
    ``J^T c`` (``K eps (sum_k c_k ||g_k||)^2``), ``d = 0`` exactly. The problem is solved exactly on the Gramian
    (:func:`mtlzoo.solvers.min_norm_simplex`, Wolfe's algorithm, with tolerances relative to each task's own gradient
    size) rather than by the paper's Frank-Wolfe iterations, which stop at a tolerance. The authors' ``MinNormSolver``
    as shipped (``find_min_norm_element``: at most 250 iterations, stopping when a step moves the point by less than
    1e-3) can end up to 0.49 of the minimum's norm away (issue 19); torchjd 0.18's ``MGDA`` runs the same iterations
    (``epsilon=1e-3``), so its update differs from this one by up to about 1% of its norm on generic inputs.

    ``normalization`` follows the authors' code (``gradient_normalizers``): the weights are
    computed on ``g_k / n_k`` and applied to the raw gradients, with ``n_k`` = 1 (``"none"``, the
    paper's algorithm), ``||g_k||`` (``"l2"``), ``L_k`` (``"loss"``) or ``L_k ||g_k||`` (``"loss+"``,
    their choice for MultiMNIST); ``L_k`` is the signed loss, as theirs, and a zero normaliser counts
    as 1. The update is then no longer the minimum-norm point, nor free of conflict. For any other
    Gramian aggregator the same normalisation is the modifier :class:`~mtlzoo.roles.modifiers.Normalize`.

    Args:
        target: ``"parameters"`` (default) or ``"representation"`` (the paper's MGDA-UB, ``mgda_ub``).
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"`` (see above).
        weighted_heads: Whether head k learns from ``c_k L_k``, as the authors back-propagate ``sum_k c_k L_k``
            (``multi_task/train_multi_task.py``), or from ``L_k``, as under the other aggregators (and torchjd's
            ``mtl_backward``).

    Example:
        >>> import torch, mtlzoo
        >>> mgda = mtlzoo.create("mgda", num_tasks=2)
        >>> mgda.aggregate(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2))
        tensor([0.5000, 0.5000])
    """

    info = StrategyInfo(
        name="mgda", summary="Minimum-norm point of the convex hull of the task gradients (multiple-gradient descent).",
        request=Request("parameters", "gramian"), paper=MGDA_PAPER,
        properties=frozenset({"non_conflicting", "permutation_invariant", "scale_linear", "stationary"}),
        cost="parameters", original_code="https://github.com/isl-org/MultiObjectiveOptimization",
    )

    def __init__(self, num_tasks: int, *, target: Target | None = None, normalization: Normalization = "none",
                 weighted_heads: bool = True) -> None:
        super().__init__(num_tasks, target=target)
        self.weighted_heads = check_flag("weighted_heads", weighted_heads)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"Parameter `normalization` should be one of {NORMALIZATIONS}. Found "
                             f"`normalization = {normalization!r}`.")
        self.normalization = normalization

    @property
    def properties(self) -> frozenset[str]:
        if self.normalization == "none":
            return self.info.properties
        return self.info.properties - {"non_conflicting", "stationary"}

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        if self.normalization != "none":
            gramian = normalized(gramian, step.losses, self.normalization)  # signed losses, as the authors'
        weights = min_norm_weights(clean_gramian(gramian, step.eps))
        reach = float(np.sqrt(np.clip(np.diag(gramian), 0.0, None)) @ weights)  # bounds ||J^T c|| and its rounding
        if self.normalization == "none" and float(weights @ gramian @ weights) <= len(weights) * step.eps * reach**2:
            return np.zeros_like(weights)  # the nearest point is 0 up to the rounding of J^T c
        return weights


class MGDAUB(MGDA):
    r"""MGDA-UB: MGDA on the gradients w.r.t. the shared representation (the paper's "upper bound").

    Paper: Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018
    (https://arxiv.org/abs/1810.04650), Section 3.3: the minimum-norm weights of the gradients
    ``dL_k/dz`` on the backbone output ``z`` minimise an upper bound of MGDA's objective; the
    backbone receives ``sum_k c_k dL_k/dz``. :class:`MGDA` on ``target="representation"`` only.

    Example:
        >>> import mtlzoo
        >>> mtlzoo.create("mgda_ub", num_tasks=3).request
        Request(where='representation', statistic='gramian', parameters=None, batches=1)
    """

    info = StrategyInfo(
        name="mgda_ub",
        summary="MGDA on the gradients w.r.t. the shared representation (Sener & Koltun's upper bound).",
        request=Request("representation", "gramian"), paper=MGDA_PAPER,
        properties=frozenset({"non_conflicting", "permutation_invariant", "scale_linear", "stationary"}),
        cost="representation", original_code="https://github.com/isl-org/MultiObjectiveOptimization",
    )
    supported_targets: tuple[Target, ...] = ("representation",)
