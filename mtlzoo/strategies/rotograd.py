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

Reference values: at step 0 and again at step ``burn_in_period`` (optimizer steps, however many
micro-batches each accumulates) each loss's value is recorded as ``L_k(t_0)``, from the step's
first micro-batch (later micro-batches of that step use it too). With ``normalize_losses=True``,
``L_k / L_k(t_0)`` is back-propagated everywhere (the heads too); otherwise the raw losses are,
and the ratios serve RotoGradNorm only. A task absent from the reference step, or whose loss is 0
there (a masked loss), takes its reference at its next step with a non-zero loss, and until then
is not normalised (with a warning): dividing by 0 would back-propagate inf.

``reduce_batch`` is a sum over the batch when ``post_shape`` is empty and a mean otherwise: the
original package reduces that way (its flattening folds the batch into the summed dimensions
unless a ``post_shape`` is given), and with Adam, the optimizer it recommends for rotations, the
scale of this objective does not change the update.

Maths run in float32 at least (the rotations stay float32 under autocast), and norms are taken
without overflow. Gradients so large that the rotation objective's gradient overflows float32
(losses scaled by 1e30) make the step fail with :class:`~mtlzoo.errors.NonFiniteGradientError`.

Differences from the ``rotograd`` package 0.1.6.0, which this module otherwise reproduces:

- the caller's heads are not wrapped in place, and everything is a registered submodule;
- step counters, initial losses and initial gradient norms are in ``state_dict()``, so a run resumes;
- ``mtl[k]`` owns task k's rotation, so its own ``state_dict()`` keeps its outputs;
- RotoGradNorm no longer computes RotoGrad's magnitude scaling only to discard it;
- extra positional arguments raise instead of being ignored;
- ``burn_in_period`` is documented as what it does (see above).

``orthogonal_map="matrix_exp"`` reproduces a rotograd run (its ``expm`` trivialization);
``"cayley"`` follows the same method through another chart of the rotations, so training differs
from the original's by rounding-level amounts that grow with the steps. The default
``"retraction"`` takes the same first step as both (the same gradient in the same coordinates) but
re-centres the chart at the current rotation after every optimizer step (a dynamic trivialization,
see :mod:`mtlzoo.strategies._rotation_bank`): no matrix function in the forward or backward, the
rotation objective's gradient in closed form, two batched n x n products per step, so its training
differs from the trivializations' by amounts of second order in the steps (on toy2d it follows
``matrix_exp`` seed by seed; ``tests/bench/test_rotograd_equivalence.py``). Its parameters are
tangent steps (the entries below the diagonal of ``X``, packed), zero between optimizer steps; Adam's
moments refer to them, in the frame of the current rotation, as in any dynamic trivialization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtlzoo.engine.leading_linear import leading_linear
from mtlzoo.errors import NotMaterializedError, ShapeMismatchError
from mtlzoo.linalg import compute_dtype, row_norms, tiny
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles import GradientSurgery
from mtlzoo.strategies._rotation_bank import (
    CHECK_EVERY,
    ORTHOGONAL_MAPS,
    ROTATION_INITS,
    OrthogonalMap,
    RotationBank,
    RotationInit,
    as_shape,
    packed_lower,
    rotate,
)
from mtlzoo.strategies._weighting import gradient_surrogate
from mtlzoo.strategies.gradnorm import gradnorm_weight_gradient, loss_ratio_values
from mtlzoo.strategy import Paper, StrategyInfo, Target

ROTOGRAD_PAPER = Paper(
    authors=("Adrián Javaloy", "Isabel Valera"),
    title="RotoGrad: Gradient Homogenization in Multitask Learning",
    venue="ICLR",
    year=2022,
    url="https://arxiv.org/abs/2103.02631",
)
DEFAULT_ORTHOGONAL_MAP: OrthogonalMap = "retraction"
LARGE_ROTATION = 1024
"""A lazily inferred rotation size above which a warning suggests ``post_shape``."""


def _full_precision(device: Any) -> Any:
    """Autocast off: rotations are computed in their own (float32) precision whatever the context."""
    return torch.autocast(torch.device(device or "cpu").type, enabled=False)


class TaskRotation(nn.Module):
    """Task k's rotation of a representation, as ``mtl[k]`` owns it (shared with the strategy)."""

    def __init__(self, rotation: nn.Module, post_dims: int) -> None:
        super().__init__()
        self.rotation = rotation
        self.post_dims = post_dims

    def forward(self, z: Tensor) -> Tensor:
        with _full_precision(z.device):
            matrix = self.rotation.weight
        return rotate(z, matrix, matrix.shape[-1], math.prod(z.shape[z.dim() - self.post_dims:]))


class _RotationObjective(torch.autograd.Function):
    r"""``sum_k reduce_b || R_k v_b - R_k^{sg} g_{k,b} ||^2`` with its gradient in closed form.

    The residual ``r_k = R_k (v - g_k)`` is one product per task, and the gradient is
    ``d/dR_k = 2 reduce_b r_{k,b} v_b^T`` (``R^{sg}`` stops gradients): two ``B n^2`` products per
    task where autograd through ``R_k v - R_k^{sg} g_k`` takes three.
    """

    @staticmethod
    def forward(ctx: Any, rotations: Tensor, reference: Tensor, blocks: Tensor, mean: bool) -> Tensor:
        # rotations (K, n, n), reference (B, n, P), blocks (K, B, n, P)
        num, batch, size, post = blocks.shape
        difference = reference.unsqueeze(0) - blocks
        if post == 1:
            residual = torch.bmm(difference.view(num, batch, size), rotations.mT)  # rows r_{k,b}^T
        else:
            residual = torch.einsum("kij,kbjp->kbip", rotations, difference)
        ctx.save_for_backward(residual, reference)
        ctx.batch_scale = 1 / batch if mean else 1.0
        return residual.pow(2).sum() * ctx.batch_scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        residual, reference = ctx.saved_tensors
        if residual.dim() == 3:
            grad = residual.mT @ reference.view(reference.shape[0], -1)
        else:
            grad = torch.einsum("kbip,bjp->kij", residual, reference)
        return grad * (2 * ctx.batch_scale * grad_output), None, None, None


class _TangentObjective(torch.autograd.Function):
    r"""The rotation objective as a function of the tangent parameters ``X_k`` (``orthogonal_map="retraction"``).

    At ``X_k = 0`` (``R_k`` orthogonal), ``||R_k (v - g_k)||^2 = ||v - g_k||^2`` and, with
    ``A_k = tril(X_k) - tril(X_k)^T``, ``dL/dA_k = R_k^T dL/dR_k = 2 M_k`` where
    ``M_k = reduce_b (v_b - g_{k,b}) v_b^T``: no product with ``R_k`` at all. The gradient is
    ``tril(2 M_k - 2 M_k^T)``, as torch's trivialization reads ``X`` (the diagonal is 0), and as
    ``v v^T`` is symmetric it is ``tril(2 N_k^T - 2 N_k)`` with ``N_k = reduce_b g_{k,b} v_b^T``:
    one ``B n^2`` product per task and no (K, B, n) difference, packed to the entries below the
    diagonal (the parameter's layout). The value is
    ``sum_k ||v - g_k||^2 = K ||v||^2 - 2 K <v, mean_k g_k> + sum_k ||g_k||^2``, from the norms.
    """

    @staticmethod
    def forward(ctx: Any, reference: Tensor, blocks: Tensor, norms: Tensor, mean: Tensor, batch_mean: bool,
                *tangents: Tensor) -> Tensor:
        # reference v (B, n, P), blocks g (K, B, n, P), norms ||g_k|| (K,), mean = mean_k g_k (B, n, P)
        ctx.save_for_backward(reference, blocks)
        ctx.batch_scale = 1 / blocks.shape[1] if batch_mean else 1.0
        ctx.tangent_dtype = tangents[0].dtype
        flat, average = reference.reshape(-1), mean.reshape(-1)
        value = blocks.shape[0] * (torch.dot(flat, flat) - 2 * torch.dot(flat, average)) + norms.square().sum()
        return value * ctx.batch_scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        reference, blocks = ctx.saved_tensors
        num, batch, size, post = blocks.shape
        weighted = reference * (2 * ctx.batch_scale * grad_output)
        if post == 1:
            products = blocks.view(num, batch, size).mT @ weighted.view(batch, size)
        else:
            products = torch.einsum("kbip,bjp->kij", blocks, weighted)
        grad = packed_lower(products.mT - products).to(ctx.tangent_dtype)
        return (None, None, None, None, None, *grad.unbind())


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
            channels of a ``(batch, channels, h, w)`` map). Only their number counts: maps of any
            spatial size are rotated channel-wise (multi-scale training, full-size evaluation).
        normalize_losses: Back-propagate ``L_k / L_k(t_0)`` instead of ``L_k`` (the heads too).
        burn_in_period: Optimizer step at which the reference values ``L_k(t_0)`` (and RotoGrad's
            initial gradient norms) are recorded again, after being recorded at step 0.
        orthogonal_map: How the rotations are kept orthogonal: ``"retraction"`` (the default, the
            fast one: the rotations are used as they are and moved, after each optimizer step that
            was taken, along the step by two matrix products; see the module docstring), or a map
            of torch's orthogonal parametrization: ``"matrix_exp"`` (the original's ``expm``: use it
            to reproduce a rotograd run number for number), ``"cayley"`` or ``"householder"``.
            ``pytest -m bench`` measures their costs (tests/bench/test_rotograd_cost.py). The Cayley
            map cannot reach a rotation by exactly pi from its base.
        rotation_init: ``"random"`` (Haar on SO(n), drawn from torch's generator, as the original)
            or ``"identity"``.
        fold_linear_heads: Where a head starts with a plain ``nn.Linear`` ``W`` on a flat
            representation (and has fewer outputs than the batch has rows), compute ``W (R_k z)`` as
            ``(W R_k) z``: the same function and gradients up to rounding, without rotating the batch
            (the step then costs less than plain training plus the rotations; see
            :mod:`mtlzoo.leading_linear`). ``False`` rotates ``z`` as the original does.

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
        request=Request("representation"),
        summary="Learns one rotation of the shared representation per task to align task gradients.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
        optimizer="adam",
        lr=1e-4,
        default_comparison=True,
        cost="representation",
        original_code="https://github.com/adrianjav/rotograd",
    )
    supported_targets: tuple[Target, ...] = ("representation",)
    unchecked_settings = ("rotation_shape", "rotation_init", "fold_linear_heads")
    running_buffers: ClassVar[tuple[str, ...]] = ("initial_losses",)
    """Per-task reference values, (K,) buffers that start as NaN."""

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
        fold_linear_heads: bool = True,
    ) -> None:
        super().__init__(num_tasks)
        if not isinstance(normalize_losses, bool):
            raise ValueError(f"Parameter `normalize_losses` should be a bool. Found `normalize_losses = "
                             f"{normalize_losses!r}`.")
        if not isinstance(fold_linear_heads, bool):
            raise ValueError(f"Parameter `fold_linear_heads` should be a bool. Found `fold_linear_heads = "
                             f"{fold_linear_heads!r}`.")
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
        self.fold_linear_heads = fold_linear_heads

        for name in self.running_buffers:
            self.register_buffer(name, torch.full((num_tasks,), math.nan))
        self.register_buffer("initial_backbone_loss", torch.tensor(math.nan))
        self.step = 0
        self._staged: dict[str, Tensor] = {}
        self._complete: list[tuple[Tensor, int]] = []
        self._seen_layout: tuple[torch.Size, RotationBank | None, tuple[int, int]] | None = None
        self.bank: RotationBank | None
        self.register_module("bank", None)
        if self.rotation_shape is not None:
            self._materialize(math.prod(self.rotation_shape), init=rotation_init)

    # -------------------------------------------------------------- rotations
    def _materialize(self, size: int, *, init: RotationInit, device: Any = None, dtype: Any = None) -> None:
        dtype = None if dtype is None else compute_dtype(dtype)
        with _full_precision(device):
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
        """The K current rotation matrices, shape (K, n, n). Through torch's parametrization they carry a
        graph (``detach()`` to inspect); with ``orthogonal_map="retraction"`` they are buffers."""
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

    def task_transform(self, task: int) -> nn.Module:
        self.check_ready()
        assert self.bank is not None
        return TaskRotation(self.bank.matrices[task], len(self.post_shape))

    def _layout(self, z: Tensor) -> tuple[int, int]:
        """Check ``z`` against the configured shapes (materialising on first sight): (n, P)."""
        seen = self._seen_layout
        if seen is not None and seen[0] == z.shape and seen[1] is self.bank:
            return seen[2]
        layout = self._check_layout(z)
        self._seen_layout = (z.shape, self.bank, layout)
        return layout

    def _check_layout(self, z: Tensor) -> tuple[int, int]:
        post_dims, ndim = len(self.post_shape), z.dim()
        if ndim < post_dims + 2:
            raise ShapeMismatchError(f"The representation of shape {tuple(z.shape)} should be (batch, "
                                     f"*rotation_shape, *post_shape) with {post_dims} post_shape dimensions.")
        if self.rotation_shape is None:
            shape = tuple(z.shape[1:ndim - post_dims])
            if self.bank is None:
                self._materialize(math.prod(shape), init=self.rotation_init, device=z.device, dtype=z.dtype)
                self._warn_if_large(math.prod(shape), z)
            self.rotation_shape = shape
        shape = self.rotation_shape
        if ndim < len(shape) + post_dims + 1:
            raise ShapeMismatchError(
                f"`rotation_shape = {shape}` with {post_dims} post_shape dimensions leaves no batch dimension in a "
                f"representation of shape {tuple(z.shape)}: give rotation_shape without the batch dimension "
                f"(rotation_shape={tuple(z.shape[1:ndim - post_dims])}).")
        found = tuple(z.shape[ndim - post_dims - len(shape):ndim - post_dims])
        assert self.bank is not None
        if found != shape or math.prod(shape) != self.bank.size:
            raise ShapeMismatchError(f"The representation of shape {tuple(z.shape)} does not end in rotation_shape "
                                     f"{shape} followed by {post_dims} post_shape dimensions (rotations of size "
                                     f"{self.bank.size}).")
        return self.bank.size, math.prod(z.shape[ndim - post_dims:])

    def _warn_if_large(self, size: int, z: Tensor) -> None:
        if size > LARGE_ROTATION:
            warnings.warn(f"{type(self).__name__} inferred rotations of size n = {size} from a representation of "
                          f"shape {tuple(z.shape)}: {self.num_tasks} x {size}^2 = {self.num_tasks * size ** 2:,} "
                          "numbers in rotation matrices, and an n x n product per task and step. For a (batch, "
                          "channels, h, w) map, pass post_shape=(h, w) to rotate the channels only.", RuntimeWarning,
                          stacklevel=5)

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        """``head(R_task z)``; with ``fold_linear_heads``, a head that starts with a linear layer ``W`` of fewer
        outputs than ``z`` has rows reads ``z`` through ``W R_task``, formed once (see
        :mod:`mtlzoo.leading_linear`)."""
        size, post_numel = self._layout(z)
        folded = leading_linear(head) \
            if self.fold_linear_heads and post_numel == 1 and len(self.rotation_shape or ()) == 1 else None
        if folded is None or folded[0].out_features >= z.numel() // size:
            return head(self.adapt(z, task))
        linear, rest = folded
        with _full_precision(z.device):
            weight = linear.weight @ self._rotation(task, z.device).to(linear.weight.dtype)
        output = nn.functional.linear(z, weight, linear.bias)
        for module in rest:
            output = module(output)
        return output

    def _rotation(self, task: int, device: Any) -> Tensor:
        """R_task as the forward uses it: no gradient (the rotation objective trains it)."""
        assert self.bank is not None
        if self.bank.retracted:  # a buffer: nothing to compute
            return self.bank.matrices[task].rotation
        with _full_precision(device):
            return self.bank.matrix(task).detach()

    def adapt(self, z: Tensor, task: int) -> Tensor:
        size, post_numel = self._layout(z)
        return rotate(z, self._rotation(task, z.device), size, post_numel)

    # ------------------------------------------------------------------ step
    def _is_reference_step(self) -> bool:
        return self.step == 0 or self.step == self.burn_in_period

    def _reference(self, name: str) -> Tensor:
        """A reference buffer as this step sees it: the staged value where the step recorded one."""
        return self._staged.get(name, getattr(self, name))

    def _is_complete(self, reference: Tensor) -> bool:
        """Whether every entry of a reference tensor is usable (finite, non-zero); remembered per tensor version."""
        version = (reference, reference._version)
        if any(reference is seen and number == version[1] for seen, number in self._complete):
            return True
        if not bool((torch.isfinite(reference) & (reference != 0)).all()):
            return False
        self._complete = [*[entry for entry in self._complete if entry[0] is not reference][-3:], version]
        return True

    def _stage_reference(self, name: str, values: Tensor, tasks: Tensor, micro_batch: int) -> None:
        """Record ``values`` as the reference of ``tasks`` on the step's first micro-batch of a reference
        step, and for any task without a valid reference yet (absent, or 0, at the last reference step)."""
        current = self._reference(name)
        if not (micro_batch == 0 and self._is_reference_step()) and self._is_complete(current):
            return  # every task has its reference: nothing to record (and no host synchronisation)
        flat = current.reshape(-1)
        valid_new = torch.isfinite(values) & (values != 0)
        missing = ~torch.isfinite(flat[tasks]) | (flat[tasks] == 0)
        take = valid_new & (missing | (micro_batch == 0 and self._is_reference_step()))
        if bool(take.any()):
            updated = flat.clone()
            updated[tasks[take]] = values[take].to(current.dtype)
            self._staged[name] = updated.reshape(current.shape)

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        losses, tasks = inputs.losses, inputs.tasks
        self._stage_reference("initial_losses", losses, tasks, inputs.micro_batch)
        if not self.normalize_losses:
            return None
        reference = self._reference("initial_losses")[tasks].to(losses.dtype)
        usable = torch.isfinite(reference) & (reference != 0)
        if not bool(usable.all()):
            bad = tasks[~usable].tolist()
            warnings.warn(f"{type(self).__name__}: the losses of tasks {bad} were 0 at their reference step, so "
                          "they are not normalised until a non-zero loss gives them a reference.",
                          RuntimeWarning, stacklevel=4)
        return torch.where(usable, 1 / torch.where(usable, reference, torch.ones_like(reference)),
                           torch.ones_like(reference))

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        value = backbone_loss.detach().reshape(1).float()
        self._stage_reference("initial_backbone_loss", value, torch.zeros(1, dtype=torch.long), self.micro_batch)
        if not self.normalize_losses:
            return None
        reference = self._reference("initial_backbone_loss")
        usable = bool(torch.isfinite(reference) & (reference != 0))
        return 1 / reference.to(backbone_loss.dtype) if usable else None

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        size, post_numel = self._layout(grads[0])
        blocks = grads.reshape(grads.shape[0], -1, size, post_numel)
        norms = row_norms(grads)
        objective = self._rotation_objective(blocks, norms, inputs)
        direction, weight_objective = self._combine_gradients(grads, norms, inputs)
        if weight_objective is not None:
            objective = weight_objective if objective is None else objective + weight_objective
        return Update(direction=direction, objective=objective)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the backbone update for K gradients (K x ...), the rotation objective back-propagated.

        State staged here is committed by :meth:`advance` (call it after each optimizer step).
        """
        tasks = torch.arange(grads.shape[0], device=grads.device)
        inputs = StepInputs(losses.detach(), tasks, self.num_tasks, micro_batch=self.micro_batch)
        self.loss_weights(inputs)
        inputs.gradients = grads
        update = self.compute(inputs)
        if update.objective is not None:
            update.objective.backward()
        self.micro_batch += 1
        assert update.direction is not None
        return update.direction

    def _rotation_objective(self, blocks: Tensor, norms: Tensor, inputs: StepInputs) -> Tensor | None:
        assert self.bank is not None
        count = blocks.shape[0]
        mean = blocks.mean(0)
        scale = row_norms(mean.unsqueeze(0))[0] / norms.clamp_min(tiny(norms.dtype))
        # As the original: summed over the batch when post_shape is empty, averaged otherwise.
        batch_mean = bool(self.post_shape)
        if self.bank.retracted:
            tangents = [self.bank.matrices[k].tangent for k in inputs.tasks.tolist()] \
                if not inputs.all_present else [module.tangent for module in self.bank.matrices]
            if not any(tangent.requires_grad for tangent in tangents):
                return None
            reference = torch.tensordot(scale / count, blocks.detach(), dims=1)
            return _TangentObjective.apply(reference, blocks.detach(), norms.detach(), mean.detach(), batch_mean,
                                           *tangents)
        rotations = self.rotations if inputs.all_present else self.rotations[inputs.tasks]
        if not rotations.requires_grad:
            return None
        reference = torch.tensordot(scale / count, blocks, dims=1).detach()
        return _RotationObjective.apply(rotations.to(blocks.dtype), reference, blocks.detach(), batch_mean)

    def _combine_gradients(self, grads: Tensor, norms: Tensor, inputs: StepInputs) -> tuple[Tensor, Tensor | None]:
        """The backbone update from the K' gradients ``grads`` and their norms ``||g_k||``, and an
        objective for the strategy's own weights (RotoGradNorm)."""
        return grads.sum(0), None

    # ------------------------------------------------------------ lifecycle
    def _commit(self) -> None:
        for name, value in self._staged.items():
            setattr(self, name, value)
        self._staged = {}
        self.step += 1
        if self.bank is not None:  # orthogonal_map="retraction": the step that was taken moves the rotations
            self.bank.retract(check=self.step % CHECK_EVERY == 0)

    def _drop_staged(self) -> None:
        self._staged = {}

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "rotation_shape": self.rotation_shape}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        shape = state["rotation_shape"]
        self.rotation_shape = None if shape is None else tuple(shape)
        self._seen_layout = None
        self._staged = {}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "bank.matrices.0.parametrizations.weight.original",
                               state_dict.get(prefix + "bank.matrices.0.rotation"))
        if self.bank is None and saved is not None:  # lazy: materialise with the saved shape, then load
            self._materialize(saved.shape[-1], init="identity", device=saved.device, dtype=saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args)


class RotoGrad(RotateOnly):
    r"""RotoGrad: RotateOnly's rotations plus gradient-magnitude homogenisation.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). The backbone update is

    ``dz = sum_k C g_k / ||g_k||``,  ``C = sum_k a_k ||g_k||``,  ``a_k = r_k / sum_j r_j``,
    ``r_k = ||g_k|| / ||g_k(t_0)||``,

    so every task pushes with the same magnitude, the one of the task that converges slowest
    weighing most; ``t_0`` is step 0, then ``burn_in_period``. An absent task is left out of the
    sums. Arguments as :class:`RotateOnly`.
    """

    info = StrategyInfo(
        name="rotograd",
        kind="surgery",
        request=Request("representation"),
        summary="Rotations that align task gradients plus scaling that equalises their magnitudes.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
        optimizer="adam",
        lr=1e-4,
        default_comparison=True,
        cost="representation",
        original_code="https://github.com/adrianjav/rotograd",
    )
    running_buffers = ("initial_losses", "initial_grad_norms")

    def _combine_gradients(self, grads: Tensor, norms: Tensor, inputs: StepInputs) -> tuple[Tensor, None]:
        norms = norms.clamp_min(tiny(norms.dtype))
        self._stage_reference("initial_grad_norms", norms, inputs.tasks, inputs.micro_batch)
        initial = self._reference("initial_grad_norms")[inputs.tasks].to(norms.dtype)
        convergence = norms / initial
        shares = convergence / convergence.sum().clamp_min(tiny(norms.dtype))
        magnitude = (shares * norms).sum()
        return torch.tensordot(magnitude / norms, grads, dims=1), None


class RotoGradNorm(RotateOnly):
    r"""RotoGradNorm: RotateOnly's rotations with GradNorm's task weights on the representation.

    Papers: Javaloy & Valera, ICLR 2022 (https://arxiv.org/abs/2103.02631), with GradNorm, Chen et
    al., ICML 2018 (https://arxiv.org/abs/1711.02257). Task weights ``w = K softmax(θ)`` (learnable
    ``θ``, so ``sum_k w_k = K``) give the backbone update ``dz = sum_k w_k g_k``, and ``θ`` minimises
    GradNorm's objective on the representation:

    ``sum_k | w_k ||g_k|| - ||(1/K) sum_j w_j g_j|| (r_k / mean_j r_j)^alpha |``,
    ``r_k = L_k / L_k(t_0)``,

    with the target term held constant. This is the original package's variant of GradNorm (the
    target from the norm of the weighted mean gradient); an absent task is left out of the sums and
    the mean. Arguments as :class:`RotateOnly`, plus:

    Args:
        alpha: GradNorm's asymmetry ``alpha >= 0`` (required, as in the original): how strongly
            tasks that train slower are pulled up.
    """

    info = StrategyInfo(
        name="rotograd_norm",
        aliases=("rotogradnorm",),
        kind="surgery",
        request=Request("representation"),
        summary="RotateOnly's rotations combined with GradNorm's learned task weights.",
        paper=ROTOGRAD_PAPER,
        learnable=True,
        adapts_representation=True,
        optimizer="adam",
        lr=1e-4,
        default_comparison=True,
        cost="representation",
        original_code="https://github.com/adrianjav/rotograd",
        suggested={"alpha": 1.5},  # GradNorm's asymmetry as Chen et al. (ICML 2018) recommend it
    )

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int] | None = None, *, alpha: float,
                 post_shape: int | Sequence[int] = (), normalize_losses: bool = False, burn_in_period: int = 20,
                 orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP,
                 rotation_init: RotationInit = "random", fold_linear_heads: bool = True) -> None:
        super().__init__(num_tasks, rotation_shape, post_shape=post_shape, normalize_losses=normalize_losses,
                         burn_in_period=burn_in_period, orthogonal_map=orthogonal_map, rotation_init=rotation_init,
                         fold_linear_heads=fold_linear_heads)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or math.isinf(alpha):
            raise ValueError(f"Parameter `alpha` should be a finite number >= 0. Found `alpha = {alpha!r}`.")
        self.alpha = float(alpha)
        self.weight_logits = nn.Parameter(torch.zeros(num_tasks))

    @property
    def task_weights(self) -> Tensor:
        """The K GradNorm weights ``w = K softmax(θ)`` (they sum to K)."""
        return self.num_tasks * torch.softmax(self.weight_logits, dim=0)

    def _combine_gradients(self, grads: Tensor, norms: Tensor, inputs: StepInputs) -> tuple[Tensor, Tensor | None]:
        weights = self.task_weights if inputs.all_present else self.task_weights[inputs.tasks]
        update = torch.tensordot(weights.detach().to(grads.dtype), grads, dims=1)
        if not weights.requires_grad:
            return update, None
        # GradNorm's objective with the targets held constant, as its gradient in closed form (host floats)
        ratios = loss_ratio_values(inputs.losses.tolist(), inputs.tasks.tolist(),
                                   self._reference("initial_losses").tolist())
        target_norm = float(row_norms(update.unsqueeze(0))[0]) / self.num_tasks
        gradient = gradnorm_weight_gradient(weights.detach().tolist(), norms.tolist(), ratios, target_norm, self.alpha,
                                            tiny(norms.dtype))
        return update, gradient_surrogate(weights, gradient)
