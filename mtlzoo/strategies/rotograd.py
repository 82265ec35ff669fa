r"""RotateOnly, RotoGrad and RotoGradNorm (Javaloy & Valera, ICLR 2022).

Each task k sees the shared representation through its own rotation, ``z_k = R_k z``, and the
rotations are learned so that the task gradients point the same way. With
``g_k = dL_k/dz`` (the gradient at the unrotated ``z``, what the backbone receives from task k):

- reference direction: ``v = mean_k( g_k ||mean_j g_j|| / ||g_k|| )``;
- rotation objective (the gradient of ``R_k`` comes only from here):
  ``sum_k reduce_batch || R_k v - R_k^{sg} g_k ||^2``, where ``R_k^{sg} g_k = dL_k/dz_k`` is the
  gradient at the rotated representation and ``sg`` stops gradients;
- backbone update ``dz``: RotateOnly ``sum_k g_k``; RotoGrad rescales every ``g_k`` to a common
  magnitude ``C = sum_k a_k ||g_k||`` with ``a_k = r_k / sum_j r_j`` and
  ``r_k = ||g_k|| / ||g_k(t_0)||``; RotoGradNorm weighs ``sum_k w_k g_k`` with GradNorm's weights.

Losses: at step 0 and again at step ``burn_in_period`` each loss's value is recorded as
``L_k(t_0)``. With ``normalize_losses=True``, ``L_k / L_k(t_0)`` is back-propagated everywhere (the
heads too); otherwise the raw losses are, and the ratios serve RotoGradNorm only.

``reduce_batch`` is a sum over the batch when ``post_shape`` is empty and a mean otherwise: the
original package reduces that way (its flattening folds the batch into the summed dimensions
unless a ``post_shape`` is given), and with Adam, the optimizer it recommends for rotations, the
scale of this objective does not change the update.

Differences from the ``rotograd`` package 0.1.6.0, which this module otherwise reproduces:

- the caller's heads are not wrapped in place, and everything is a registered submodule;
- step counters, initial losses and initial gradient norms are in ``state_dict()``, so a run resumes;
- RotoGradNorm no longer computes RotoGrad's magnitude scaling only to discard it;
- extra positional arguments raise instead of being ignored;
- ``burn_in_period`` is documented as what it does (see above).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.errors import NotMaterializedError, ShapeMismatchError
from mtlzoo.strategies._rotation_bank import (
    ORTHOGONAL_MAPS,
    ROTATION_INITS,
    OrthogonalMap,
    RotationBank,
    RotationInit,
    as_shape,
    rotate,
)
from mtlzoo.strategy import GradientSurgery, Paper, StrategyInfo, Target

ROTOGRAD_PAPER = Paper(
    authors=("Adrián Javaloy", "Isabel Valera"),
    title="RotoGrad: Gradient Homogenization in Multitask Learning",
    venue="ICLR",
    year=2022,
    url="https://arxiv.org/abs/2103.02631",
)
EPSILON = 1e-15
DEFAULT_ORTHOGONAL_MAP: OrthogonalMap = "cayley"


class RotateOnly(GradientSurgery):
    r"""RotoGrad's rotations alone: ``z_k = R_k z``, backbone update ``dz = sum_k g_k``.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). The rotations minimise
    ``sum_k reduce_batch || R_k v - dL_k/dz_k ||^2`` towards the reference
    ``v = mean_k g_k ||mean_j g_j|| / ||g_k||`` (see the module docstring).

    Args:
        num_tasks: K.
        rotation_shape: Shape of the rotated part of ``z`` (without the batch dimension), an int
            for a flat representation. ``None`` infers it at the first forward as every dimension
            between the batch dimension and ``post_shape``; until then ``check_ready`` raises.
        post_shape: Trailing dimensions of ``z`` left unrotated (``(h, w)`` to rotate only the
            channels of a ``(batch, channels, h, w)`` map).
        normalize_losses: Back-propagate ``L_k / L_k(t_0)`` instead of ``L_k`` (the heads too).
        burn_in_period: Step at which the reference values ``L_k(t_0)`` (and RotoGrad's initial
            gradient norms) are recorded again, after being recorded at step 0.
        orthogonal_map: Map of torch's orthogonal parametrization: ``"cayley"`` (the default),
            ``"matrix_exp"`` (the original's ``expm``) or ``"householder"``. Chosen by measurement
            (``pytest -m bench -s``, 2-core CPU, K = 3): a RotoGrad step costs about 2.2x / 2.5x /
            6x an ``ls`` step at n = 16 / 64 / 256 with ``cayley``, 2.5x / 3.3x / 15x with
            ``matrix_exp`` and 3.1x / 6.7x / 26x with ``householder``, while the 2-D toy problem
            ends equally well with each. The Cayley map cannot reach a rotation by exactly pi
            from its base, which RotoGrad's learned rotations have not needed in our checks.
        rotation_init: ``"random"`` (Haar on SO(n), drawn from torch's generator, as the original)
            or ``"identity"``.

    Example:
        >>> import torch, mtlzoo
        >>> _ = torch.manual_seed(0)
        >>> strategy = mtlzoo.create("rotate_only", num_tasks=2, rotation_shape=3)
        >>> strategy.rotations.shape
        torch.Size([2, 3, 3])
    """

    info = StrategyInfo(
        name="rotate_only",
        aliases=("rotateonly",),
        kind="surgery",
        needs="representation_grads",
        summary="Learns one rotation of the shared representation per task to align task gradients.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
    )
    supported_targets: tuple[Target, ...] = ("representation",)
    running_buffers: tuple[str, ...] = ("initial_losses",)
    """Per-task running state, (K,) buffers that start as NaN and take the losses' dtype."""

    def __init__(
        self,
        num_tasks: int,
        rotation_shape: int | Sequence[int] | None = None,
        *,
        post_shape: int | Sequence[int] = (),
        normalize_losses: bool = False,
        burn_in_period: int = 20,
        orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP,
        rotation_init: RotationInit = "random",
    ) -> None:
        super().__init__(num_tasks)
        if not isinstance(normalize_losses, bool):
            raise ValueError(f"Parameter `normalize_losses` should be a bool. Found `normalize_losses = "
                             f"{normalize_losses!r}`.")
        if isinstance(burn_in_period, bool) or not isinstance(burn_in_period, int) or burn_in_period < 0:
            raise ValueError(f"Parameter `burn_in_period` should be a non-negative int. Found `burn_in_period = "
                             f"{burn_in_period!r}`.")
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"Parameter `orthogonal_map` should be one of {ORTHOGONAL_MAPS}. Found "
                             f"`orthogonal_map = {orthogonal_map!r}`.")
        if rotation_init not in ROTATION_INITS:
            raise ValueError(f"Parameter `rotation_init` should be one of {ROTATION_INITS}. Found "
                             f"`rotation_init = {rotation_init!r}`.")
        self.rotation_shape = None if rotation_shape is None else as_shape(
            rotation_shape, "rotation_shape", allow_empty=False)
        self.post_shape = as_shape(post_shape, "post_shape", allow_empty=True)
        self.normalize_losses = normalize_losses
        self.burn_in_period = burn_in_period
        self.orthogonal_map = orthogonal_map
        self.rotation_init = rotation_init

        for name in self.running_buffers:
            self.register_buffer(name, torch.full((num_tasks,), math.nan))
        self.register_buffer("initial_backbone_loss", torch.tensor(math.nan))
        self.step = 0
        self._has_backbone_reference = False
        self.bank: RotationBank | None
        self.register_module("bank", None)
        if self.rotation_shape is not None:
            self._materialize(math.prod(self.rotation_shape), init=rotation_init)

    # -------------------------------------------------------------- rotations
    def _materialize(self, size: int, *, init: RotationInit, device: Any = None, dtype: Any = None) -> None:
        self.bank = RotationBank(self.num_tasks, size, orthogonal_map=self.orthogonal_map, init=init,
                                 device=device, dtype=dtype)

    def check_ready(self) -> None:
        if self.bank is None:
            raise NotMaterializedError(
                f"{type(self).__name__} creates its rotations at the first forward because `rotation_shape` was "
                "not given, so they cannot go into an optimizer yet. Either pass `rotation_shape` (the shape of "
                "the backbone output without its batch dimension), or run one forward, mtl(x), before building "
                "the optimizer."
            )

    @property
    def rotations(self) -> Tensor:
        """The K current rotation matrices, shape (K, n, n). They carry a graph: ``detach()`` to inspect."""
        self.check_ready()
        assert self.bank is not None
        return self.bank.weight

    @rotations.setter
    def rotations(self, value: Tensor) -> None:
        if not isinstance(value, Tensor) or value.dim() != 3 or value.shape[-1] != value.shape[-2] \
                or value.shape[0] != self.num_tasks:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ShapeMismatchError(f"Rotations should be a ({self.num_tasks}, n, n) tensor. Found {shape}.")
        if self.bank is None:
            if self.rotation_shape is not None and math.prod(self.rotation_shape) != value.shape[-1]:
                raise ShapeMismatchError(f"Rotations of size {value.shape[-1]} do not fit `rotation_shape = "
                                         f"{self.rotation_shape}`.")
            self._materialize(value.shape[-1], init="identity", device=value.device, dtype=value.dtype)
        assert self.bank is not None
        self.bank.set(value)

    def _layout(self, z: Tensor) -> tuple[int, int]:
        """Check ``z`` against the configured shapes (materialising on first sight): (n, P)."""
        post, ndim = self.post_shape, z.dim()
        if ndim < len(post) + 2 or tuple(z.shape[ndim - len(post):]) != post:
            raise ShapeMismatchError(f"The representation of shape {tuple(z.shape)} should be (batch, "
                                     f"*rotation_shape, *post_shape) with post_shape = {post}.")
        if self.rotation_shape is None:
            shape = tuple(z.shape[1:ndim - len(post)])
            if self.bank is None:
                self._materialize(math.prod(shape), init=self.rotation_init, device=z.device, dtype=z.dtype)
            self.rotation_shape = shape
        shape = self.rotation_shape
        found = tuple(z.shape[ndim - len(post) - len(shape):ndim - len(post)])
        assert self.bank is not None
        if found != shape or math.prod(shape) != self.bank.size:
            raise ShapeMismatchError(f"The representation of shape {tuple(z.shape)} does not end in rotation_shape "
                                     f"{shape} + post_shape {post} (rotations of size {self.bank.size}).")
        return self.bank.size, math.prod(post)

    def adapt(self, z: Tensor, task: int) -> Tensor:
        size, post_numel = self._layout(z)
        assert self.bank is not None
        return rotate(z, self.bank.matrix(task).detach(), size, post_numel)

    # ------------------------------------------------------------------ step
    def _is_reference_step(self) -> bool:
        return self.step == 0 or self.step == self.burn_in_period

    def prepare(self, losses: Tensor, backbone_loss: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if self._is_reference_step():
            self.initial_losses = losses.detach().clone()
        if backbone_loss is not None and (self._is_reference_step() or not self._has_backbone_reference):
            self.initial_backbone_loss = backbone_loss.detach().clone().reshape(())
            self._has_backbone_reference = True
        if not self.normalize_losses:
            return losses, backbone_loss
        if backbone_loss is not None:
            backbone_loss = backbone_loss / self.initial_backbone_loss
        return losses / self.initial_losses, backbone_loss

    def loss_ratios(self, losses: Tensor) -> Tensor:
        """``L_k / L_k(t_0)`` from the losses ``prepare`` returned."""
        return losses if self.normalize_losses else losses / self.initial_losses

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        size, post_numel = self._layout(grads[0])
        blocks = grads.reshape(grads.shape[0], -1, size, post_numel)
        norms = grads.flatten(1).norm(dim=1)
        self._rotation_backward(blocks, norms)
        update = self._combine_gradients(grads, norms, losses)
        self.step += 1
        return update

    def _rotation_backward(self, blocks: Tensor, norms: Tensor) -> None:
        """Back-propagate the rotation objective into the rotations' parameters."""
        rotations = self.rotations
        if not rotations.requires_grad:
            return
        scale = blocks.mean(0).norm() / norms.clamp_min(EPSILON)
        reference = (blocks * scale.view(-1, 1, 1, 1)).mean(0)
        rotated_grads = torch.einsum("kij,kbjp->kbip", rotations.detach(), blocks)
        residual = torch.einsum("kij,bjp->kbip", rotations, reference) - rotated_grads
        per_example = residual.pow(2).sum(dim=(-2, -1))
        # As the original: summed over the batch when post_shape is empty, averaged otherwise.
        reduced = per_example.mean(dim=1) if self.post_shape else per_example.sum(dim=1)
        reduced.sum().backward()

    def _combine_gradients(self, grads: Tensor, norms: Tensor, losses: Tensor) -> Tensor:
        """The backbone update from the K gradients ``grads`` and their norms ``||g_k||``."""
        return grads.sum(0)

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "rotation_shape": self.rotation_shape,
                "has_backbone_reference": self._has_backbone_reference}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        shape = state["rotation_shape"]
        self.rotation_shape = None if shape is None else tuple(shape)
        self._has_backbone_reference = bool(state["has_backbone_reference"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "bank.matrices.0.parametrizations.weight.original")
        if self.bank is None and saved is not None:  # lazy: materialise with the saved shape, then load
            self._materialize(saved.shape[-1], init="identity", device=saved.device, dtype=saved.dtype)
        for name in (*self.running_buffers, "initial_backbone_loss"):
            if prefix + name in state_dict:  # the buffers take the saved dtype (that of the losses)
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)


class RotoGrad(RotateOnly):
    r"""RotoGrad: RotateOnly's rotations plus gradient-magnitude homogenisation.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). The backbone update is

    ``dz = sum_k C g_k / ||g_k||``,  ``C = sum_k a_k ||g_k||``,  ``a_k = r_k / sum_j r_j``,
    ``r_k = ||g_k|| / ||g_k(t_0)||``,

    so every task pushes with the same magnitude, the one of the task that converges slowest
    weighing most; ``t_0`` is step 0, then ``burn_in_period``. Arguments as :class:`RotateOnly`.
    """

    info = StrategyInfo(
        name="rotograd",
        kind="surgery",
        needs="representation_grads",
        summary="Rotations that align task gradients plus scaling that equalises their magnitudes.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
    )
    running_buffers = ("initial_losses", "initial_grad_norms")

    def _combine_gradients(self, grads: Tensor, norms: Tensor, losses: Tensor) -> Tensor:
        norms = norms.clamp_min(EPSILON)
        if self._is_reference_step():
            self.initial_grad_norms = norms.clone()
        convergence = norms / self.initial_grad_norms
        shares = convergence / convergence.sum().clamp_min(EPSILON)
        magnitude = (shares * norms).sum()
        return torch.tensordot(magnitude / norms, grads, dims=1)


class RotoGradNorm(RotateOnly):
    r"""RotoGradNorm: RotateOnly's rotations with GradNorm's task weights on the representation.

    Papers: Javaloy & Valera, ICLR 2022 (https://arxiv.org/abs/2103.02631), with GradNorm, Chen et
    al., ICML 2018 (https://arxiv.org/abs/1711.02257). Task weights ``w = K softmax(θ)`` (learnable
    ``θ``, so ``sum_k w_k = K``) give the backbone update ``dz = sum_k w_k g_k``, and ``θ`` minimises
    GradNorm's objective on the representation:

    ``sum_k | w_k ||g_k|| - ||(1/K) sum_j w_j g_j|| (r_k / mean_j r_j)^alpha |``,
    ``r_k = L_k / L_k(t_0)``,

    with the target term held constant. Arguments as :class:`RotateOnly`, plus:

    Args:
        alpha: GradNorm's asymmetry ``alpha >= 0`` (required, as in the original): how strongly
            tasks that train slower are pulled up.
    """

    info = StrategyInfo(
        name="rotograd_norm",
        aliases=("rotogradnorm",),
        kind="surgery",
        needs="representation_grads",
        summary="RotateOnly's rotations combined with GradNorm's learned task weights.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
    )

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int] | None = None, *, alpha: float,
                 post_shape: int | Sequence[int] = (), normalize_losses: bool = False, burn_in_period: int = 20,
                 orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP,
                 rotation_init: RotationInit = "random") -> None:
        super().__init__(num_tasks, rotation_shape, post_shape=post_shape, normalize_losses=normalize_losses,
                         burn_in_period=burn_in_period, orthogonal_map=orthogonal_map, rotation_init=rotation_init)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or math.isinf(alpha):
            raise ValueError(f"Parameter `alpha` should be a finite number >= 0. Found `alpha = {alpha!r}`.")
        self.alpha = float(alpha)
        self.weight_logits = nn.Parameter(torch.zeros(num_tasks))

    @property
    def task_weights(self) -> Tensor:
        """The K GradNorm weights ``w = K softmax(θ)`` (they sum to K)."""
        return self.num_tasks * torch.softmax(self.weight_logits, dim=0)

    def _combine_gradients(self, grads: Tensor, norms: Tensor, losses: Tensor) -> Tensor:
        weights = self.task_weights.to(grads.dtype)
        update = torch.tensordot(weights.detach(), grads, dims=1)
        if weights.requires_grad:
            ratios = self.loss_ratios(losses)
            targets = (update.norm() / self.num_tasks) * (ratios / ratios.mean()) ** self.alpha
            (weights * norms - targets).abs().sum().backward()
        return update
