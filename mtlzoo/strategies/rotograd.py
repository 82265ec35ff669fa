r"""RotateOnly, RotoGrad and RotoGradNorm (Javaloy & Valera, ICLR 2022): RotoGrad's rotations
(:class:`~mtlzoo.strategies.rotations.Rotations`) composed with a rule for the backbone's update.

Maths run in float32 at least: gradients that overflow it fail the step with
:class:`~mtlzoo.errors.NonFiniteGradientError`. Where these differ from the ``rotograd`` package 0.1.6.0:
docs/rotograd.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtlzoo.linalg import row_norms, tiny
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles.aggregator import Aggregator
from mtlzoo.roles.composite import Composite, standalone
from mtlzoo.strategies._rotation_bank import OrthogonalMap, RotationBank, RotationInit
from mtlzoo.strategies._weighting import gradient_surrogate
from mtlzoo.strategies.gradnorm import gradnorm_weight_gradient, loss_ratio_values
from mtlzoo.strategies.rotations import (
    DEFAULT_ORTHOGONAL_MAP,
    ROTOGRAD_CODE,
    ROTOGRAD_PAPER,
    ReferenceSteps,
    Rotations,
    family_info,
)
from mtlzoo.strategy import StrategyInfo, Target, check_int, check_number

__all__ = ["ROTOGRAD_PAPER", "GradNormWeights", "MagnitudeScaling", "RotateOnly", "Rotations", "RotoGrad",
           "RotoGradNorm"]


class _RepresentationAggregator(ReferenceSteps, Aggregator):
    """Base of the family's aggregators: reference values (:class:`ReferenceSteps`) and the standalone form."""

    def __init__(self, num_tasks: int, *, burn_in_period: int = 20, target: Target | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.burn_in_period = check_int("burn_in_period", burn_in_period, 0)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the update for K task gradients (K x ...) and their losses (own objective back-propagated)."""
        return standalone(self, grads, losses)


class MagnitudeScaling(_RepresentationAggregator):
    r"""RotoGrad's gradient-magnitude homogenisation: ``sum_k (C / ||g_k||) g_k`` (see :class:`RotoGrad`).

    Paper: Javaloy & Valera, ICLR 2022 (https://arxiv.org/abs/2103.02631), Section 4. It reads the
    norms alone; an absent task is left out of the sums. Norms are floored at the smallest normal
    number of the reference's dtype (a zero gradient has ``r_k = 1`` and takes no part in the update).

    Args:
        burn_in_period: The second step at which ``||g_k(t_0)||`` is recorded.
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.
    """

    info = StrategyInfo(
        name="rotograd_scaling", summary="RotoGrad's scaling: every task gradient rescaled to one common magnitude.",
        request=Request("representation", "norms"), paper=ROTOGRAD_PAPER, cost="representation",
        original_code=ROTOGRAD_CODE,
    )
    statistic = "norms"

    def __init__(self, num_tasks: int, *, burn_in_period: int = 20, target: Target | None = None) -> None:
        super().__init__(num_tasks, burn_in_period=burn_in_period, target=target)
        self.declare_references("initial_grad_norms")

    def compute(self, inputs: StepInputs) -> Update:
        norms = inputs.norms if inputs.norms is not None else row_norms(inputs.gradients)  # type: ignore[arg-type]
        floor = max(tiny(norms.dtype), tiny(self.initial_grad_norms.dtype))
        norms = norms.clamp_min(floor)
        initial = self.record_reference("initial_grad_norms", norms, inputs.tasks)[inputs.tasks].to(norms.dtype)
        convergence = norms / initial
        shares = convergence / convergence.sum().clamp_min(tiny(norms.dtype))
        magnitude = (shares * norms).sum()
        return Update(weights=magnitude / norms)


class GradNormWeights(_RepresentationAggregator):
    r"""GradNorm's task weights ``w = K softmax(θ)`` on the task gradients, as RotoGradNorm learns them.

    Papers: Javaloy & Valera, ICLR 2022 (https://arxiv.org/abs/2103.02631), with GradNorm, Chen et
    al., ICML 2018 (https://arxiv.org/abs/1711.02257). The update is ``sum_k w_k g_k`` and ``θ``
    minimises GradNorm's objective in the original package's variant (see :class:`RotoGradNorm`),
    by the ``gradnorm`` strategy's formula (:func:`~mtlzoo.strategies.gradnorm.gradnorm_weight_gradient`).

    Args:
        alpha: GradNorm's asymmetry ``alpha >= 0`` (required, as in the original).
        burn_in_period: The second step at which ``L_k(t_0)`` is recorded.
        target: ``"representation"`` (default, as the paper) or ``"parameters"``.
    """

    info = StrategyInfo(
        name="gradnorm_weights", summary="GradNorm's learned task weights applied to the task gradients.",
        request=Request("representation"), paper=ROTOGRAD_PAPER, learnable=True, optimizer="adam", lr=1e-4,
        cost="representation", original_code=ROTOGRAD_CODE,
    )
    statistic = "gradients"

    def __init__(self, num_tasks: int, *, alpha: float, burn_in_period: int = 20,
                 target: Target | None = None) -> None:
        alpha = check_number("alpha", alpha)
        super().__init__(num_tasks, burn_in_period=burn_in_period, target=target)
        self.alpha = alpha
        self.weight_logits = nn.Parameter(torch.zeros(num_tasks))
        self.declare_references("initial_losses")

    @property
    def task_weights(self) -> Tensor:
        """The K GradNorm weights ``w = K softmax(θ)`` (they sum to K)."""
        return self.num_tasks * torch.softmax(self.weight_logits, dim=0)

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        reference = self.record_reference("initial_losses", inputs.losses, inputs.tasks)
        weights = self.task_weights if inputs.all_present else self.task_weights[inputs.tasks]
        update = torch.tensordot(weights.detach().to(grads.dtype), grads, dims=1)
        if not weights.requires_grad:
            return Update(direction=update)
        norms = inputs.norms if inputs.norms is not None else row_norms(grads)
        # GradNorm's objective with the targets held constant, as its gradient in closed form (host floats)
        ratios = loss_ratio_values(inputs.losses.tolist(), inputs.tasks.tolist(), reference.tolist())
        target_norm = float(row_norms(update.unsqueeze(0))[0]) / self.num_tasks
        gradient = gradnorm_weight_gradient(weights.detach().tolist(), norms.tolist(), ratios, target_norm, self.alpha,
                                            tiny(norms.dtype))
        return Update(direction=update, objective=gradient_surrogate(weights, gradient))


class RotateOnly(Composite):
    r"""RotoGrad's rotations alone: ``z_k = R_k z``, backbone update ``dz = sum_k g_k``.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). The composition of the rotations adapter
    (:class:`~mtlzoo.strategies.rotations.Rotations`, held as ``adapter``) with the plain sum; the
    rotations minimise ``sum_k reduce_batch || R_k v - dL_k/dz_k ||^2`` towards the reference
    ``v = mean_k g_k ||mean_j g_j|| / ||g_k||``. Its arguments are the rotations' (see there).

    Example:
        >>> import torch, mtlzoo
        >>> _ = torch.manual_seed(0)
        >>> strategy = mtlzoo.create("rotate_only", num_tasks=2, rotation_shape=3)
        >>> strategy.rotations.shape
        torch.Size([2, 3, 3])
    """

    info = family_info("rotate_only", "Learns one rotation of the shared representation per task to align task "
                       "gradients.", aliases=("rotateonly",), default_comparison=True)
    composes = ("adapter",)
    supported_targets = ("representation",)
    unchecked_settings = ("rotation_shape", "rotation_init", "fold_linear_heads")
    adapter: Rotations

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int] | None = None, *,
                 post_shape: int | Sequence[int] = (), normalize_losses: bool = False, burn_in_period: int = 20,
                 orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP, rotation_init: RotationInit = "random",
                 fold_linear_heads: bool = True) -> None:
        rotations = Rotations(num_tasks, rotation_shape, post_shape=post_shape, normalize_losses=normalize_losses,
                              burn_in_period=burn_in_period, orthogonal_map=orthogonal_map,
                              rotation_init=rotation_init, fold_linear_heads=fold_linear_heads)
        super().__init__(num_tasks, adapter=rotations, aggregator=self.shared_update(num_tasks))

    def shared_update(self, num_tasks: int) -> Aggregator | None:
        """The aggregator this member of the family composes with the rotations (none: the plain sum)."""
        return None

    @property  # the rotations' attributes, as the single-module strategy of mtlzoo 0.1.0 had them
    def rotations(self) -> Tensor:
        """The K rotation matrices, (K, n, n) (``adapter.rotations``); assigning sets them."""
        return self.adapter.rotations

    @rotations.setter
    def rotations(self, value: Tensor) -> None:
        self.adapter.rotations = value

    @property
    def bank(self) -> RotationBank | None:
        return self.adapter.bank

    @property
    def step(self) -> int:
        """Optimizer steps taken (the rotations' counter)."""
        return self.adapter.state.step

    @property
    def initial_losses(self) -> Tensor:
        """The reference losses ``L_k(t_0)`` the rotations recorded (NaN until recorded)."""
        return self.adapter.initial_losses

    @property
    def rotation_shape(self) -> tuple[int, ...] | None:
        return self.adapter.rotation_shape


class RotoGrad(RotateOnly):
    r"""RotoGrad: RotateOnly's rotations plus gradient-magnitude homogenisation.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). The rotations adapter composed with :class:`MagnitudeScaling`
    (held as ``aggregator``): the backbone update is

    ``dz = sum_k C g_k / ||g_k||``,  ``C = sum_k a_k ||g_k||``,  ``a_k = r_k / sum_j r_j``,
    ``r_k = ||g_k|| / ||g_k(t_0)||``,

    so every task pushes with the same magnitude, the one of the task that converges slowest weighing most; ``t_0`` is
    step 0, then ``burn_in_period``. An absent task is left out of the sums. Arguments as :class:`RotateOnly`.
    """

    info = family_info("rotograd", "Rotations that align task gradients plus scaling that equalises their "
                       "magnitudes.", default_comparison=True)
    composes = ("aggregator", "adapter")

    def shared_update(self, num_tasks: int) -> Aggregator:
        return MagnitudeScaling(num_tasks, burn_in_period=self.hparams["burn_in_period"])

    @property
    def initial_grad_norms(self) -> Tensor:
        """The reference norms ``||g_k(t_0)||`` (``aggregator.initial_grad_norms``)."""
        return self.aggregator.initial_grad_norms  # type: ignore[union-attr]


class RotoGradNorm(RotateOnly):
    r"""RotoGradNorm: RotateOnly's rotations with GradNorm's task weights on the representation.

    Papers: Javaloy & Valera, ICLR 2022 (https://arxiv.org/abs/2103.02631), with GradNorm, Chen et al., ICML 2018
    (https://arxiv.org/abs/1711.02257). The rotations adapter composed with :class:`GradNormWeights` (held as
    ``aggregator``): task weights ``w = K softmax(θ)`` (learnable ``θ``, so ``sum_k w_k = K``) give the backbone update
    ``dz = sum_k w_k g_k``, and ``θ`` minimises GradNorm's objective on the representation:

    ``sum_k | w_k ||g_k|| - ||(1/K) sum_j w_j g_j|| (r_k / mean_j r_j)^alpha |``,
    ``r_k = L_k / L_k(t_0)``,

    with the target term held constant. This is the original package's variant of GradNorm (the
    target from the norm of the weighted mean gradient); an absent task is left out of the sums and
    the mean. Arguments as :class:`RotateOnly`, plus:

    Args:
        alpha: GradNorm's asymmetry ``alpha >= 0`` (required, as in the original): how strongly
            tasks that train slower are pulled up.
    """

    info = family_info("rotograd_norm", "RotateOnly's rotations combined with GradNorm's learned task weights.",
                       aliases=("rotogradnorm",), default_comparison=True,
                       suggested={"alpha": 1.5})  # Chen et al. (ICML 2018) recommend 1.5 where a problem gives none
    composes = ("aggregator", "adapter")

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int] | None = None, *, alpha: float,
                 post_shape: int | Sequence[int] = (), normalize_losses: bool = False, burn_in_period: int = 20,
                 orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP,
                 rotation_init: RotationInit = "random", fold_linear_heads: bool = True) -> None:
        super().__init__(num_tasks, rotation_shape, post_shape=post_shape, normalize_losses=normalize_losses,
                         burn_in_period=burn_in_period, orthogonal_map=orthogonal_map, rotation_init=rotation_init,
                         fold_linear_heads=fold_linear_heads)

    def shared_update(self, num_tasks: int) -> Aggregator:
        return GradNormWeights(num_tasks, alpha=self.hparams["alpha"], burn_in_period=self.hparams["burn_in_period"])

    @property
    def alpha(self) -> float:
        return self.aggregator.alpha  # type: ignore[union-attr]

    @property
    def weight_logits(self) -> nn.Parameter:
        """GradNorm's logits ``θ`` (``aggregator.weight_logits``)."""
        return self.aggregator.weight_logits  # type: ignore[union-attr]

    @property
    def task_weights(self) -> Tensor:
        """The K GradNorm weights ``w = K softmax(θ)`` (they sum to K)."""
        return self.aggregator.task_weights  # type: ignore[union-attr]
