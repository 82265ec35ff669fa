r"""GradNorm: loss weights learned so that the tasks' gradient norms train at balanced rates.

The machinery here (the reference losses ``L_k(0)`` and ratios, the relative inverse training
rates, the L1 objective with constant targets) is written as small functions so that RotoGradNorm,
which keeps the original ``rotograd`` package's variant, can share it where the two coincide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlzoo.linalg import row_norms, tiny
from mtlzoo.protocol import LAST_LAYER, Request, StepInputs, Update
from mtlzoo.roles.weighting import WeightingStrategy
from mtlzoo.strategies._weighting import gradient_surrogate
from mtlzoo.strategy import Paper, StrategyInfo

GRADNORM_PAPER = Paper(
    authors=("Zhao Chen", "Vijay Badrinarayanan", "Chen-Yu Lee", "Andrew Rabinovich"),
    title="GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
    venue="ICML",
    year=2018,
    url="https://arxiv.org/abs/1711.02257",
)
Target = Literal["parameters", "representation"]
WEIGHT_FLOOR = 1e-6
"""The smallest weight kept after a step (times K / sum): a weight of 0 would hide its task's gradient norm."""


def stage_reference(reference: Tensor, losses: Tensor, tasks: Tensor) -> Tensor | None:
    """``reference`` with ``L_k(0)`` filled in for the present tasks that have none yet, or ``None`` if unchanged.

    A task takes its reference at its first step with a finite, non-zero loss (absent tasks and
    zero losses wait), so the ratios ``L_k / L_k(0)`` never divide by zero.
    """
    missing = ~torch.isfinite(reference[tasks]) | (reference[tasks] == 0)
    take = missing & torch.isfinite(losses) & (losses != 0)
    if not bool(take.any()):
        return None
    updated = reference.clone()
    updated[tasks[take]] = losses[take].to(reference.dtype)
    return updated


def loss_ratios(losses: Tensor, reference: Tensor) -> Tensor:
    """``L_k / L_k(0)`` (1 where no reference is usable)."""
    usable = torch.isfinite(reference) & (reference != 0)
    return torch.where(usable, losses / torch.where(usable, reference, torch.ones_like(reference)),
                       torch.ones_like(losses))


def inverse_training_rates(ratios: Tensor, alpha: float) -> Tensor:
    """GradNorm's ``r_k^alpha`` with ``r_k = ratio_k / mean_j ratio_j`` (the relative inverse training rate)."""
    return (ratios / ratios.mean().clamp_min(tiny(ratios.dtype))) ** alpha


def loss_ratio_values(losses: list[float], tasks: list[int], reference: list[float]) -> list[float]:
    """``L_k / L_k(t_0)`` on the host, 1 where the reference is not usable (not finite, or 0)."""
    return [loss / reference[k] if math.isfinite(reference[k]) and reference[k] != 0 else 1.0
            for k, loss in zip(tasks, losses)]


def gradnorm_weight_gradient(weights: list[float], norms: list[float], ratios: list[float], target_norm: float,
                             alpha: float, floor: float) -> list[float]:
    """``dL_grad/dw_k = sign(w_k n_k - target_k) n_k``, ``target_k = target_norm (r_k / mean_j r_j)^alpha``.

    The gradient of :func:`gradnorm_objective` with the targets held constant, on host floats: 0 where
    the difference is 0 or not a number, as autograd's ``|x|``; a negative ratio to a fractional
    ``alpha`` is not a number, as torch's ``pow``. ``floor`` bounds the mean ratio from below (the
    dtype's smallest normal number, as the tensor code's clamp).
    """
    mean_ratio = max(sum(ratios) / len(ratios), floor)
    gradient = []
    for weight, norm, ratio in zip(weights, norms, ratios):
        try:
            target = target_norm * math.pow(ratio / mean_ratio, alpha)
        except (ValueError, OverflowError):
            target = math.nan
        difference = weight * norm - target
        sign = 0.0 if difference == 0 or math.isnan(difference) else math.copysign(1.0, difference)
        gradient.append(sign * norm)
    return gradient


def gradnorm_objective(weights: Tensor, norms: Tensor, targets: Tensor) -> Tensor:
    """``L_grad = sum_k | w_k ||g_k|| - target_k |``, differentiable in ``weights`` only (the targets held constant).

    Args:
        weights: The present tasks' weights ``w_k`` (requiring grad).
        norms: The unweighted norms ``||g_k||`` (detached).
        targets: The target norms of the weighted gradients.
    """
    return (weights * norms.detach() - targets.detach()).abs().sum()


class GradNorm(WeightingStrategy):
    r"""GradNorm: learned loss weights that balance the tasks' gradient norms and training rates.

    Paper: Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks*, ICML 2018 (https://arxiv.org/abs/1711.02257).
    The model learns from ``sum_k w_k L_k``; the weights ``w`` (a parameter, initially 1, for the
    user's optimizer) learn only from the gradient loss

    ``L_grad = sum_k | G_k - mean_j(G_j) r_k^alpha |``,  ``G_k = || d(w_k L_k) / dW ||``,
    ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))``,

    with the targets ``mean_j(G_j) r_k^alpha`` held constant (Algorithm 1), and after every
    optimizer step they are renormalised to ``sum_k w_k = K``. ``W`` is the last shared layer's
    weights, the paper's choice; the norms come without a Jacobian (see :func:`mtlzoo.autograd.layer_norms`:
    for a last layer ``z = h W^T + b``, ``dL_k/dW = (dL_k/dz)^T h``). ``L_k(0)`` is each task's
    loss at its first step (from that step's first micro-batch). An absent task is left out of the
    means and its weight gets no gradient (the renormalisation still rescales it with the others).

    Differences from the paper: a weight that a large learning rate drives to or below zero is
    held at a small positive floor before the renormalisation (its gradient norm could not be
    measured at 0). RotoGradNorm (``rotograd_norm``) keeps the original ``rotograd`` package's
    variant instead (targets from the norm of the weighted mean gradient, weights ``K softmax(θ)``).

    Args:
        num_tasks: K.
        alpha: The asymmetry ``alpha >= 0`` (required): how strongly tasks that train slower are
            pulled up. The paper tunes it per problem (0.12 on its synthetic regression, 1.5 on
            NYUv2); 0 equalises the gradient norms.
        layer: The backbone parameters ``W`` to read the norms on, by name (as
            ``backbone.named_parameters()`` gives them, e.g. ``"4.weight"``); ``None`` for the last
            shared layer's weights, found from the graph of the backbone output.
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
        name="gradnorm",
        kind="weighting",
        request=Request("parameters", "norms", parameters=LAST_LAYER),
        summary="Learns loss weights so that the task gradient norms on the last shared layer train at equal rates.",
        paper=GRADNORM_PAPER,
        properties=frozenset({"permutation_invariant", "scale_linear"}),
        learnable=True,
        optimizer="adam",
        lr=1e-2,
        cost="layer",
        original_code="",
        suggested={"alpha": 1.5},  # Chen et al. (ICML 2018) recommend 1.5 where a problem gives none
    )

    def __init__(self, num_tasks: int, *, alpha: float, layer: str | Sequence[str] | None = None,
                 target: Target = "parameters") -> None:
        super().__init__(num_tasks)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or math.isinf(alpha):
            raise ValueError(f"Parameter `alpha` should be a finite number >= 0. Found `alpha = {alpha!r}`.")
        if target not in ("parameters", "representation"):
            raise ValueError(f"Parameter `target` should be 'parameters' or 'representation'. Found `target = "
                             f"{target!r}`.")
        names = (layer,) if isinstance(layer, str) else None if layer is None else tuple(layer)
        if names is not None and (not names or not all(isinstance(n, str) and n for n in names)):
            raise ValueError(f"Parameter `layer` should be a parameter name or a sequence of them. Found `layer = "
                             f"{layer!r}`.")
        if names is not None and target == "representation":
            raise ValueError("Parameter `layer` names parameters, so it needs target='parameters'. Found "
                             f"`layer = {layer!r}` with `target = 'representation'`.")
        self.alpha = float(alpha)
        self.layer = names
        self.target: Target = target
        self._request = Request("representation", "norms") if target == "representation" else Request(
            "parameters", "norms", parameters=names if names is not None else LAST_LAYER)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), math.nan))
        self._referenced = False
        self._staged: dict[str, Tensor] = {}

    @property
    def request(self) -> Request:
        return self._request

    @property
    def properties(self) -> frozenset[str]:
        weights = self.task_weights.detach()
        if bool((weights == weights[0]).all()):
            return self.info.properties
        return self.info.properties - {"permutation_invariant"}

    # ------------------------------------------------------------------ the weights
    def weights(self, losses: Tensor) -> Tensor:
        return self.task_weights.detach().to(losses.dtype)

    def scalarize(self, losses: Tensor) -> Tensor:
        return (self.weights(losses) * losses).sum()

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        if not self._referenced:
            reference = self._staged.get("initial_losses", self.initial_losses)
            staged = stage_reference(reference, losses.detach(), tasks)
            if staged is not None:
                self._staged["initial_losses"] = staged
        weights = self.task_weights.detach()
        return (weights if tasks.shape[0] == self.num_tasks else weights[tasks]).to(losses.dtype)

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        return None  # the weights learn from the gradient loss only, never from sum_k w_k L_k

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.norms is not None
        return Update(objective=self.objective_surrogate(inputs.norms, inputs.losses, inputs.tasks))

    def objective_surrogate(self, weighted_norms: Tensor, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """``sum_k w_k c_k`` with ``c = dL_grad/dw`` held constant: the gradient of :meth:`objective`, in closed form.

        With the targets held constant, ``dL_grad/dw_k = sign(w_k n_k - target_k) n_k`` (``n_k`` the
        unweighted norm; 0 where the difference is 0 or not a number, as autograd's ``|x|``): K
        numbers, computed on the host (Python floats) from one read of the norms, the losses, the
        references and the weights, instead of a graph of a dozen small operations.
        """
        everyone = tasks.shape[0] == self.num_tasks
        weights = self.task_weights if everyone else self.task_weights[tasks]
        if not weights.requires_grad:
            return None
        tiny_value = tiny(weighted_norms.dtype)
        weighted = weighted_norms.tolist()
        present = tasks.tolist()
        reference = self._staged.get("initial_losses", self.initial_losses).tolist()
        current = weights.detach().tolist()
        ratios = loss_ratio_values(losses.tolist(), present, reference)
        unweighted = [norm / max(weight, tiny_value) for norm, weight in zip(weighted, current)]
        gradient = gradnorm_weight_gradient(current, unweighted, ratios, sum(weighted) / len(weighted), self.alpha,
                                            tiny_value)
        return gradient_surrogate(weights, gradient)

    def objective(self, weighted_norms: Tensor, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """``L_grad`` for the present tasks, from the norms of the weighted tasks' gradients."""
        everyone = tasks.shape[0] == self.num_tasks
        weights = (self.task_weights if everyone else self.task_weights[tasks]).to(weighted_norms.dtype)
        if not weights.requires_grad:
            return None
        reference = self._staged.get("initial_losses", self.initial_losses)
        reference = (reference if everyone else reference[tasks]).to(weighted_norms.dtype)
        losses = losses.to(weighted_norms.dtype)
        ratios = losses / reference if self._referenced else loss_ratios(losses, reference)
        targets = weighted_norms.mean() * inverse_training_rates(ratios, self.alpha)
        norms = weighted_norms / weights.detach().clamp_min(tiny(weights.dtype))  # the engine's are of w_k L_k
        return gradnorm_objective(weights, norms, targets)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``sum_k w_k g_k`` for K task gradients (K x ...), ``L_grad`` back-propagated into the weights.

        Call :meth:`advance` after the optimizer step (it renormalises the weights).
        """
        tasks = torch.arange(grads.shape[0], device=grads.device)
        weights = self.task_weights_for(losses.detach(), tasks).to(grads.dtype)
        objective = self.objective(row_norms(grads) * weights.abs(), losses.detach(), tasks)
        if objective is not None:
            objective.backward()
        return torch.tensordot(weights, grads, dims=1)

    # ------------------------------------------------------------------ lifecycle
    def _commit(self) -> None:
        if "initial_losses" in self._staged:
            self.initial_losses = self._staged["initial_losses"]
            self._referenced = _all_referenced(self.initial_losses)
        self._staged = {}
        with torch.no_grad():
            weights = self.task_weights.clamp_(min=WEIGHT_FLOOR)
            weights.mul_(self.num_tasks / float(weights.sum()))

    def _drop_staged(self) -> None:
        self._staged = {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._staged = {}
        self._referenced = _all_referenced(self.initial_losses)  # the buffers are loaded before the extra state


def _all_referenced(reference: Tensor) -> bool:
    """Whether every task has its ``L_k(0)`` (then the per-step check is skipped)."""
    return bool((torch.isfinite(reference) & (reference != 0)).all())
