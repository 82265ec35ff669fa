r"""GradNorm: loss weights learned so that the task gradient norms train at equal rates (shared with RotoGradNorm)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtlzoo.linalg import compute_dtype, row_norms, tiny
from mtlzoo.protocol import LAST_LAYER, Request, StepInputs, Update
from mtlzoo.roles.weighting import LossWeighting
from mtlzoo.strategies._weighting import WidensState, all_usable, widen
from mtlzoo.strategy import Paper, StrategyInfo, check_number

GRADNORM_PAPER = Paper(
    authors=("Zhao Chen", "Vijay Badrinarayanan", "Chen-Yu Lee", "Andrew Rabinovich"),
    title="GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", venue="ICML",
    year=2018, url="https://arxiv.org/abs/1711.02257",
)
Target = Literal["parameters", "representation"]
ALL_SHARED = "all"
"""``GradNorm(layer="all")``: the norms on every shared parameter (the request of an aggregator on the parameters)."""
WEIGHT_FLOOR = 1e-6
"""The smallest weight kept after a step (times K / sum): a weight of 0 would hide its task's gradient norm."""


def loss_ratios(losses: Tensor, reference: Tensor) -> Tensor:
    """``L_k / L_k(0)`` (1 where no reference is usable: not finite, or 0)."""
    usable = torch.isfinite(reference) & (reference != 0)
    return torch.where(usable, losses / torch.where(usable, reference, torch.ones_like(reference)),
                       torch.ones_like(losses))


def gradnorm_objective(weights: Tensor, norms: Tensor, ratios: Tensor, target_norm: Tensor | float,
                       alpha: float, floor: float | None = None) -> Tensor:
    """GradNorm's gradient loss (Algorithm 1) ``sum_k | w_k n_k - target_norm r_k^alpha |``, targets constant.

    ``weights``: the present tasks' ``w_k`` (requiring grad); ``norms``: the unweighted ``n_k = ||g_k||``;
    ``ratios``: ``L_k / L_k(0)``, whose relative inverse training rates are ``r_k = ratio_k / mean_j ratio_j``
    (the mean floored at ``floor``, default the dtype's smallest normal number); ``target_norm``: the mean
    norm of the weighted gradients, ``mean_j w_j n_j``; ``alpha``: the asymmetry.
    """
    ratios = ratios.detach()
    rates = (ratios / ratios.mean().clamp_min(tiny(ratios.dtype) if floor is None else floor)) ** alpha
    return (weights * norms.detach() - (target_norm * rates).detach()).abs().sum()


def loss_ratio_values(losses: list[float], tasks: list[int], reference: list[float]) -> list[float]:
    """:func:`loss_ratios` on host floats, of tasks ``tasks`` (RotoGradNorm's face)."""
    chosen = torch.tensor(reference, dtype=torch.float64)[torch.tensor(tasks, dtype=torch.long)]
    return loss_ratios(torch.tensor(losses, dtype=torch.float64), chosen).tolist()


def gradnorm_weight_gradient(weights: list[float], norms: list[float], ratios: list[float], target_norm: float,
                             alpha: float, floor: float) -> list[float]:
    """``dL_grad/dw_k = sign(w_k n_k - target_k) n_k`` on host floats (RotoGradNorm's face): autograd of
    :func:`gradnorm_objective`, so 0 where the difference is 0 or not a number."""
    with torch.enable_grad():
        leaf = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
        objective = gradnorm_objective(leaf, torch.tensor(norms, dtype=torch.float64),
                                       torch.tensor(ratios, dtype=torch.float64), target_norm, alpha, floor)
        (gradient,) = torch.autograd.grad(objective, leaf)
    return gradient.tolist()


class GradNorm(WidensState, LossWeighting):
    r"""GradNorm: learned loss weights that balance the tasks' gradient norms and training rates.

    Paper: Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks*, ICML 2018 (https://arxiv.org/abs/1711.02257).
    The model learns from ``sum_k w_k L_k``; the weights ``w`` (a parameter, initially 1, for the
    user's optimizer) learn only from the gradient loss (:func:`gradnorm_objective`)

    ``L_grad = sum_k | G_k - mean_j(G_j) r_k^alpha |``,  ``G_k = || d(w_k L_k) / dW ||``,
    ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``,

    with the targets ``mean_j(G_j) r_k^alpha`` held constant (Algorithm 1), and after every optimizer step they are
    renormalised to ``sum_k w_k = K``. ``W`` is the last shared layer's weights, the paper's choice (the norms come
    without a Jacobian: for ``z = h W^T + b``, ``dL_k/dW = (dL_k/dz)^T h``). ``L_k(0)`` is each task's loss at its first
    step. An absent task is left out of the means and its weight gets no gradient. Computed in the losses' dtype.

    Under an aggregator: with ``layer="all"`` GradNorm reads the norms on every shared parameter
    (with ``target="representation"``, on ``z``), what an aggregator on that target reads, so the
    two compose (the aggregator combines the gradients of the weighted losses ``w_k L_k``)::

        mtlzoo.compose(weighting=GradNorm(K, alpha=1.5, layer="all"), aggregator="upgrad")

    Differences from the paper: a weight that a large learning rate drives to or below zero is
    held at a small positive floor before the renormalisation (its gradient norm could not be
    measured at 0). RotoGradNorm (``rotograd_norm``) keeps the original ``rotograd`` package's
    variant instead (targets from the norm of the weighted mean gradient, weights ``K softmax(θ)``).

    Args:
        alpha: The asymmetry ``alpha >= 0`` (required): how strongly tasks that train slower are pulled up. The paper
            tunes it per problem (0.12 on its synthetic regression, 1.5 on NYUv2); 0 equalises the gradient norms.
        layer: The backbone parameters ``W`` to read the norms on, by name (as ``backbone.named_parameters()`` gives
            them, e.g. ``"4.weight"``); ``None`` for the last shared layer's weights, found from the graph of the
            backbone output; ``"all"`` for every shared parameter (what an aggregator on the parameters reads).
        target: ``"parameters"`` (on ``W``, the paper) or ``"representation"`` (the norms of
            ``d(w_k L_k)/dz`` on the backbone output ``z``, cheaper still; ``layer`` must be ``None``).

    Example:
        >>> import mtlzoo
        >>> strategy = mtlzoo.create("gradnorm", num_tasks=2, alpha=1.5)
        >>> strategy.task_weights
        Parameter containing:
        tensor([1., 1.], requires_grad=True)
    """

    info = StrategyInfo(
        name="gradnorm", request=Request("parameters", "norms", parameters=LAST_LAYER),
        summary="Learns loss weights so that the task gradient norms on the last shared layer train at equal rates.",
        paper=GRADNORM_PAPER, properties=frozenset({"permutation_invariant", "scale_linear"}), learnable=True,
        optimizer="adam", lr=1e-2, cost="layer", original_code="",
        suggested={"alpha": 1.5},  # Chen et al. (ICML 2018) recommend 1.5 where a problem gives none
    )

    widening = ("initial_losses",)
    per_task = ("task_weights",)

    def __init__(self, num_tasks: int, *, alpha: float, layer: str | Sequence[str] | None = None,
                 target: Target = "parameters") -> None:
        super().__init__(num_tasks)
        self.alpha = check_number("alpha", alpha)
        if target not in ("parameters", "representation"):
            raise ValueError(f"Parameter `target` should be 'parameters' or 'representation'. Found `target = "
                             f"{target!r}`.")
        names = _layer_names(layer)
        if layer is not None and target == "representation":
            raise ValueError("Parameter `layer` names parameters, so it needs target='parameters'. Found "
                             f"`layer = {layer!r}` with `target = 'representation'`.")
        self.layer = names
        self.target: Target = target
        self._request = Request("representation", "norms") if target == "representation" else Request(
            "parameters", "norms", parameters=names)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.declare_state(initial_losses=torch.full((num_tasks,), math.nan))

    @property
    def request(self) -> Request:
        return self._request

    def scalarize(self, losses: Tensor) -> Tensor:
        """``sum_k w_k L_k`` with the learned weights held constant (they learn from ``L_grad`` only)."""
        self._stage_reference(losses.detach())
        return (self.present(self.task_weights).detach().to(losses.dtype) * losses).sum()

    def _stage_reference(self, losses: Tensor) -> None:
        """``L_k(0)``: a present task without a usable reference takes this loss (if finite and non-zero)."""
        if all_usable(self, self.initial_losses) and losses.dtype == self.initial_losses.dtype:
            return  # every task has its reference (read once per change of the buffer, not per step)
        widen(self, self.widening, losses.dtype)
        reference = self.state.initial_losses
        reference = reference.to(torch.promote_types(reference.dtype, losses.dtype))
        tasks = self.present_tasks
        mine = self.present(reference)
        take = (~torch.isfinite(mine) | (mine == 0)) & torch.isfinite(losses) & (losses != 0)
        if tasks is None:
            self.state.initial_losses = torch.where(take, losses, mine)
        else:
            self.state.write_rows("initial_losses", tasks, torch.where(take, losses, mine))

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        return None  # the weights learn from the gradient loss only, never from sum_k w_k L_k

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.norms is not None
        return Update(objective=self.objective(inputs.norms, inputs.losses, inputs.tasks))

    def objective(self, weighted_norms: Tensor, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """``L_grad`` for the present tasks, from the norms of the weighted tasks' gradients ``||d(w_k L_k)/dW||``."""
        weights = self.of_present(self.task_weights, tasks)
        if not weights.requires_grad:
            return None
        dtype = torch.promote_types(weighted_norms.dtype, compute_dtype(losses.dtype))
        weighted_norms = weighted_norms.to(dtype)
        reference = self.of_present(self.state.initial_losses, tasks).to(dtype)
        norms = weighted_norms / weights.detach().to(dtype).clamp_min(tiny(dtype))  # the engine's are of w_k L_k
        losses = losses.to(dtype)
        ratios = losses / reference if all_usable(self, self.initial_losses) else loss_ratios(losses, reference)
        return gradnorm_objective(weights.to(dtype), norms, ratios, weighted_norms.mean(), self.alpha)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``sum_k w_k g_k`` for K task gradients (K x ...), ``L_grad`` back-propagated into the weights.

        Call :meth:`advance` after the optimizer step (it renormalises the weights).
        """
        tasks = torch.arange(grads.shape[0], device=grads.device)
        weights = self.weights(losses).to(grads.dtype)
        objective = self.objective(row_norms(grads) * weights.abs(), losses.detach(), tasks)
        if objective is not None:
            objective.backward()
        return torch.tensordot(weights, grads, dims=1)

    def on_advance(self) -> None:
        """The renormalisation ``sum_k w_k = K`` (after the floor), once per optimizer step."""
        with torch.no_grad():
            weights = self.task_weights.clamp_(min=WEIGHT_FLOOR)
            weights.mul_(self.num_tasks / weights.sum())


def _layer_names(layer: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The request's parameter names: :data:`LAST_LAYER` for ``None``, ``None`` (all shared) for ``"all"``."""
    if layer is None:
        return LAST_LAYER
    if layer == ALL_SHARED:
        return None
    names = (layer,) if isinstance(layer, str) else tuple(layer) if isinstance(layer, (list, tuple)) else None
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"Parameter `layer` should be None (the last shared layer), {ALL_SHARED!r} (every shared "
                         "parameter), a parameter name or a sequence of them (as backbone.named_parameters() gives "
                         f"them). Found `layer = {layer!r}`.")
    return names
