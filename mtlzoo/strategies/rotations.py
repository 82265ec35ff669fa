r"""RotoGrad's rotations as an adapter of the representation (Javaloy & Valera, ICLR 2022).

Reference values (:class:`ReferenceSteps`): at step 0 and again at step ``burn_in_period`` (optimizer steps, however
many micro-batches each accumulates) each task's value is recorded as its reference (``L_k(t_0)``), from the step's
first micro-batch. A task absent from the reference step, or whose value is 0 there (a masked loss), takes its reference
at its next step with a non-zero value. With ``normalize_losses=True``, ``L_k / L_k(t_0)`` is back-propagated everywhere
(the heads too); a task without a usable reference is not normalised until it has one (with a warning): dividing by 0
would back-propagate inf.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.engine.leading_linear import leading_linear
from mtlzoo.errors import NotMaterializedError, ShapeMismatchError
from mtlzoo.linalg import compute_dtype, row_norms, tiny
from mtlzoo.protocol import Request, StepInputs, Update
from mtlzoo.roles.adapter import Adapter
from mtlzoo.state import RunningState
from mtlzoo.strategies._rotation_bank import (
    CHECK_EVERY,
    ORTHOGONAL_MAPS,
    ROTATION_INITS,
    OrthogonalMap,
    RotationBank,
    RotationInit,
    RotationObjective,
    TangentObjective,
    as_shape,
    rotate,
)
from mtlzoo.strategies._weighting import all_usable
from mtlzoo.strategy import Paper, StrategyInfo, check_flag, check_int

ROTOGRAD_PAPER = Paper(
    authors=("Adrián Javaloy", "Isabel Valera"), title="RotoGrad: Gradient Homogenization in Multitask Learning",
    venue="ICLR", year=2022, url="https://arxiv.org/abs/2103.02631",
)
ROTOGRAD_CODE = "https://github.com/adrianjav/rotograd"


def family_info(name: str, summary: str, **more: Any) -> StrategyInfo:
    """The metadata of the RotoGrad family's strategies: rotations of the representation, trained by Adam."""
    return StrategyInfo(name=name, summary=summary, request=Request("representation"), paper=ROTOGRAD_PAPER,
                        learnable=True, adapts_representation=True, optimizer="adam", lr=1e-4,
                        cost="representation", original_code=ROTOGRAD_CODE, **more)

DEFAULT_ORTHOGONAL_MAP: OrthogonalMap = "retraction"
LARGE_ROTATION = 1024
"""A lazily inferred rotation size above which a warning suggests ``post_shape``."""


def _full_precision(device: Any) -> Any:
    """Autocast off: rotations are computed in their own (float32) precision whatever the context."""
    return torch.autocast(torch.device(device or "cpu").type, enabled=False)


class ReferenceSteps:
    """Mixin of the RotoGrad family's parts: per-task reference values recorded at step 0 and at step
    ``burn_in_period`` (see the module docstring), in (K,) fields that are NaN until recorded and written by
    every micro-batch (a task first present in a later one takes its reference there); a step counter."""

    burn_in_period: int
    num_tasks: int
    state: RunningState
    micro_batch: int

    def declare_references(self, *names: str) -> None:
        self.declare_state(step=0)  # type: ignore[attr-defined]
        self.declare_state(per_step="every", **{name: torch.full((self.num_tasks,), math.nan)  # type: ignore
                                                for name in names})

    def record_reference(self, name: str, values: Tensor, tasks: Tensor) -> Tensor:
        """Stage ``values`` as the reference of ``tasks`` on the first micro-batch of a reference step, and for
        any task without a usable reference yet (finite and non-zero *in the reference's dtype*); return the
        references this step uses."""
        current: Tensor = getattr(self.state, name)
        renew = self.micro_batch == 0 and self.state.step in (0, self.burn_in_period)
        if not renew and all_usable(self, current):
            return current  # every task has its reference: nothing to record
        values = values.detach().to(current.dtype)
        flat = current.reshape(-1)
        known = flat[tasks]
        take = torch.isfinite(values) & (values != 0) & ((~torch.isfinite(known) | (known == 0)) | renew)
        if not bool(take.any()):
            return current
        updated = flat.clone()
        updated[tasks[take]] = values[take]
        updated = updated.reshape(current.shape)
        setattr(self.state, name, updated)
        return updated

    def on_advance(self) -> None:
        self.state.step += 1


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


class Rotations(ReferenceSteps, Adapter):
    r"""RotoGrad's rotations: ``z_k = R_k z``, learned so that the task gradients on ``z`` align.

    Paper: Javaloy & Valera, *RotoGrad: Gradient Homogenization in Multitask Learning*, ICLR 2022
    (https://arxiv.org/abs/2103.02631). With ``g_k = dL_k/dz`` (at the unrotated ``z``) the rotations
    minimise, as their objective (``Update(objective=...)``),

    ``sum_k reduce_batch || R_k v - R_k^{sg} g_k ||^2``,  ``v = mean_k( g_k ||mean_j g_j|| / ||g_k|| )``,

    where ``R_k^{sg} g_k = dL_k/dz_k`` (``sg`` stops gradients). The backbone's update is the aggregator's (the plain
    sum alone: the ``rotate_only`` strategy, which ``mtlzoo.compose(adapter="rotate_only")`` stands for).
    ``reduce_batch`` is a sum over the batch when ``post_shape`` is empty and a mean otherwise, as the original package
    reduces (with Adam, which it recommends for rotations, the scale does not change the update). Running state: the
    step counter, the reference losses, the rotations; :meth:`on_advance` retracts them.

    Args:
        rotation_shape: Shape of the rotated part of ``z`` (without the batch dimension), an int
            for a flat representation. ``None`` infers it at the first forward as every dimension
            between the batch dimension and ``post_shape``; until then ``check_ready`` raises.
        post_shape: Trailing dimensions of ``z`` left unrotated (``(h, w)`` to rotate only the
            channels of a ``(batch, channels, h, w)`` map). Only their number counts: maps of any
            spatial size are rotated channel-wise (multi-scale training, full-size evaluation).
        normalize_losses: Back-propagate ``L_k / L_k(t_0)`` instead of ``L_k`` (the heads too).
        burn_in_period: Optimizer step at which the reference values ``L_k(t_0)`` are recorded
            again, after being recorded at step 0.
        orthogonal_map: How the rotations are kept orthogonal: ``"retraction"`` (the default, the fast one: moved after
            each optimizer step by two matrix products, see :mod:`mtlzoo.strategies._rotation_bank`), or a map of
            torch's orthogonal parametrization: ``"matrix_exp"`` (the original's ``expm``: a rotograd run number for
            number), ``"cayley"`` (which cannot reach a rotation by pi from its base) or ``"householder"``.
        rotation_init: ``"random"`` (Haar on SO(n), drawn from torch's generator, as the original) or ``"identity"``.
        fold_linear_heads: Where a head starts with a plain ``nn.Linear`` ``W`` on a flat
            representation (and has fewer outputs than the batch has rows), compute ``W (R_k z)`` as
            ``(W R_k) z``: the same function and gradients up to rounding, without rotating the batch
            (see :mod:`mtlzoo.engine.leading_linear`). ``False`` rotates ``z`` as the original does.

    Example:
        >>> import torch, mtlzoo
        >>> from mtlzoo.strategies.rotations import Rotations
        >>> _ = torch.manual_seed(0)
        >>> strategy = mtlzoo.compose(adapter=Rotations(2, rotation_shape=3), aggregator="upgrad")
        >>> strategy.adapter.rotations.shape, strategy.kind
        (torch.Size([2, 3, 3]), 'surgery')
    """

    info = family_info("rotations", "One learned rotation of the shared representation per task, aligning the "
                       "task gradients.")
    unchecked_settings = ("rotation_shape", "rotation_init", "fold_linear_heads")

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int] | None = None, *,
                 post_shape: int | Sequence[int] = (), normalize_losses: bool = False, burn_in_period: int = 20,
                 orthogonal_map: OrthogonalMap = DEFAULT_ORTHOGONAL_MAP, rotation_init: RotationInit = "random",
                 fold_linear_heads: bool = True) -> None:
        super().__init__(num_tasks)
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"Parameter `orthogonal_map` should be one of {ORTHOGONAL_MAPS}. Found "
                             f"`orthogonal_map = {orthogonal_map!r}`.")
        if rotation_init not in ROTATION_INITS:
            raise ValueError(f"Parameter `rotation_init` should be one of {ROTATION_INITS}. Found "
                             f"`rotation_init = {rotation_init!r}`.")
        self.burn_in_period = check_int("burn_in_period", burn_in_period, 0)
        # state, not only a setting: inferred at the first forward where not given, and saved
        self.declare_state(rotation_shape=None if rotation_shape is None else as_shape(
            rotation_shape, "rotation_shape", allow_empty=False))
        self.post_shape = as_shape(post_shape, "post_shape", allow_empty=True)
        self.normalize_losses = check_flag("normalize_losses", normalize_losses)
        self.orthogonal_map = orthogonal_map
        self.rotation_init = rotation_init
        self.fold_linear_heads = check_flag("fold_linear_heads", fold_linear_heads)
        self.declare_references("initial_losses")
        self.declare_state(per_step="every", initial_backbone_loss=torch.tensor(math.nan))
        self._seen_layout: tuple[torch.Size, RotationBank | None, tuple[int, int]] | None = None
        self.bank: RotationBank | None
        self.register_module("bank", None)
        if self.rotation_shape is not None:
            self._materialize(math.prod(self.rotation_shape), init=rotation_init)

    @property
    def rotation_shape(self) -> tuple[int, ...] | None:
        """The shape of the rotated part of ``z`` (``None`` until inferred at the first forward)."""
        shape = self.state.rotation_shape
        return None if shape is None else tuple(shape)

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
                "the backbone output without its batch dimension), or run one forward, mtl(x), first.")

    @property
    def rotations(self) -> Tensor:
        """The K current rotation matrices, (K, n, n): buffers, or through torch's parametrization with a graph."""
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
                if self.bank.size > LARGE_ROTATION:  # type: ignore[union-attr]
                    warnings.warn(f"{type(self).__name__} inferred rotations of size n = {math.prod(shape)} from a "
                                  f"representation of shape {tuple(z.shape)}: K n^2 numbers in rotation matrices, "
                                  "and an n x n product per task and step. For a (batch, channels, h, w) map, pass "
                                  "post_shape=(h, w) to rotate the channels only.", RuntimeWarning, stacklevel=5)
            with self.state.direct():
                self.state.rotation_shape = shape
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

    def predict(self, head: nn.Module, z: Tensor, task: int) -> Any:
        """``head(R_task z)``, or ``z`` read through ``W R_task`` (see ``fold_linear_heads``)."""
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

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        """Records the reference losses; with ``normalize_losses``, ``1 / L_k(t_0)``."""
        losses, tasks = inputs.losses, inputs.tasks
        reference = self.record_reference("initial_losses", losses, tasks)
        if not self.normalize_losses:
            return None
        present = reference[tasks].to(losses.dtype)
        usable = torch.isfinite(present) & (present != 0)
        if not bool(usable.all()):
            bad = tasks[~usable].tolist()
            warnings.warn(f"{type(self).__name__}: the losses of tasks {bad} were 0 at their reference step, so "
                          "they are not normalised until a non-zero loss gives them a reference.",
                          RuntimeWarning, stacklevel=5)
        return torch.where(usable, 1 / torch.where(usable, present, torch.ones_like(present)), torch.ones_like(present))

    def backbone_loss_weight(self, backbone_loss: Tensor) -> Tensor | None:
        """Records the backbone loss's reference; with ``normalize_losses``, ``1 / L_b(t_0)``."""
        reference = self.record_reference("initial_backbone_loss", backbone_loss.detach().reshape(1).float(),
                                          torch.zeros(1, dtype=torch.long, device=backbone_loss.device))
        if not self.normalize_losses:
            return None
        usable = bool(torch.isfinite(reference) & (reference != 0))
        return 1 / reference.to(backbone_loss.dtype) if usable else None

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        size, post_numel = self._layout(grads[0])
        blocks = grads.reshape(grads.shape[0], -1, size, post_numel)
        norms = inputs.norms if inputs.norms is not None else row_norms(grads)
        return Update(objective=self._rotation_objective(blocks, norms, inputs))

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
            return TangentObjective.apply(reference, blocks.detach(), norms.detach(), mean.detach(), batch_mean,
                                          *tangents)
        rotations = self.rotations if inputs.all_present else self.rotations[inputs.tasks]
        if not rotations.requires_grad:
            return None
        reference = torch.tensordot(scale / count, blocks, dims=1).detach()
        return RotationObjective.apply(rotations.to(blocks.dtype), reference, blocks.detach(), batch_mean)

    def on_advance(self) -> None:
        """Count the step; ``orthogonal_map="retraction"``: the step that was taken moves the rotations."""
        super().on_advance()
        if self.bank is not None:
            self.bank.retract(check=self.state.step % CHECK_EVERY == 0)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "bank.matrices.0.parametrizations.weight.original",
                               state_dict.get(prefix + "bank.matrices.0.rotation"))
        if self.bank is None and saved is not None:  # lazy: materialise with the saved shape, then load
            self._materialize(saved.shape[-1], init="identity", device=saved.device, dtype=saved.dtype)
        self._seen_layout = None
        super()._load_from_state_dict(state_dict, prefix, *args)
