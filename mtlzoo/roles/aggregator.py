"""The aggregator role: K task gradients (or their K x K Gramian) to the one update of the shared part.

Two forms, each one method: :class:`GramianAggregator` (``weigh(G, step) -> c``, the update ``J^T c``: MGDA, UPGrad,
CAGrad, IMTL-G, Nash-MTL, PCGrad) and :class:`DirectionAggregator` (``combine(gradients, inputs) -> d``, built from the
gradients themselves: GradDrop). On non-finite statistics both answer a step with a non-finite update (the engine raises
:class:`~mtlzoo.errors.NonFiniteGradientError`, or a ``GradScaler`` skips the step) and raise that error standalone
(:meth:`Aggregator.aggregate`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from mtlzoo.errors import InvalidStrategyError, NonFiniteGradientError
from mtlzoo.linalg import all_finite, compute_dtype, flat_rows
from mtlzoo.protocol import Request, StepInputs, Update, Where
from mtlzoo.solvers import from_host, to_host
from mtlzoo.strategy import TARGETS, Strategy, Target


@dataclass(frozen=True)
class HostStep:
    """What a Gramian aggregator reads besides the Gramian, on the host.

    Attributes:
        losses: The present tasks' losses, float64, shape ``(K',)``.
        tasks: Their task indices, ``(K',)`` int64, increasing (rows of the Gramian to task indices).
        num_tasks: K, all tasks.
        eps: The rounding unit of the dtype the Gramian was computed in (tolerances scale with it).
    """

    losses: np.ndarray
    tasks: np.ndarray
    num_tasks: int
    eps: float

    @classmethod
    def of(cls, inputs: StepInputs, dtype: torch.dtype) -> HostStep:
        eps = torch.finfo(dtype).eps
        if inputs.host_losses is not None and inputs.present is not None:  # read by the engine's checks already
            return cls(np.array(inputs.host_losses, dtype=np.float64), np.array(inputs.present, dtype=np.int64),
                       inputs.num_tasks, eps)
        return cls(to_host(inputs.losses), inputs.tasks.cpu().numpy(), inputs.num_tasks, eps)

    @classmethod
    def standalone(cls, losses: Tensor, dtype: torch.dtype) -> HostStep:
        count = losses.shape[0]
        return cls(to_host(losses.detach()), np.arange(count), count, torch.finfo(dtype).eps)


def check_gradients(grads: Tensor, losses: Tensor, owner: object) -> None:
    """Standalone input checks: a (K, ...) matrix with K losses, finite (else a clear error)."""
    name = type(owner).__name__
    if grads.dim() < 2:
        raise ValueError(f"{name}.aggregate takes a (K, n) matrix of task gradients. Found `grads.shape = "
                         f"{tuple(grads.shape)}`.")
    if losses.shape != grads.shape[:1]:
        raise ValueError(f"{name}.aggregate takes one loss per row of `grads`. Found {tuple(losses.shape)} losses for "
                         f"{grads.shape[0]} rows.")
    if not all_finite(grads):
        raise NonFiniteGradientError(f"{name}: the task gradients have non-finite entries (nan or inf); no update "
                                     "is defined.")


class Aggregator(Strategy):
    """A strategy that combines the K per-task gradients into one update of the shared part.

    Subclasses take one of the two forms (:class:`GramianAggregator`, :class:`DirectionAggregator`),
    or override :meth:`compute`.

    Args:
        num_tasks: K.
        target: ``"representation"`` (gradients w.r.t. the backbone output ``z``, Sener & Koltun's
            cheap variant) or ``"parameters"`` (the Jacobian w.r.t. the shared parameters). ``None``
            takes the default from ``info.request``.
    """

    role = "aggregator"
    supported_targets: ClassVar[tuple[Target, ...]] = TARGETS
    statistic: ClassVar[Literal["gradients", "gramian", "norms"] | None] = None
    """The statistic the engine gives :meth:`compute` (``None``: the one ``info.request`` names)."""

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks)
        default: Where = self.info.request.where
        if default not in TARGETS:
            raise InvalidStrategyError(f"{type(self).__name__}.info.request is {self.info.request}; an aggregator "
                                       f"(gradient surgery) reads gradients on one of {TARGETS}.")
        target = default if target is None else target
        if target not in self.supported_targets:
            raise ValueError(
                f"Parameter `target` should be one of {self.supported_targets} for {type(self).__name__}. "
                f"Found `target = {target!r}`."
            )
        self.target: Target = target

    @property
    def request(self) -> Request:
        made = self.__dict__.get("_request")
        if made is None or made.where != self.target:  # read several times a step: made once per target
            made = dataclasses.replace(self.info.request, where=self.target,
                                       statistic=self.statistic or self.info.request.statistic)
            self.__dict__["_request"] = made
        return made

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: reduce K per-task gradients (K x ...) to one gradient of shape ``grads.shape[1:]``."""
        raise NotImplementedError(f"{type(self).__name__} should implement `aggregate` or `compute`.")

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.gradients is not None
        return Update(direction=self.aggregate(inputs.gradients, inputs.losses))


class GramianAggregator(Aggregator):
    r"""An aggregator whose update is ``J^T c``, with the K weights ``c`` read from the Gramian ``G = J J^T``.

    Subclasses implement :meth:`weigh`, on the host in float64 numpy. Inside a step the engine hands
    the present tasks' Gramian (summed per parameter: the K x n Jacobian is never concatenated) and
    applies ``J_p^T c`` on each shared parameter.
    """

    statistic = "gramian"

    def weigh(self, gramian: np.ndarray, step: HostStep) -> np.ndarray:
        """The weights ``c`` of the present tasks for this finite Gramian.

        Args:
            gramian: The ``(K', K')`` Gramian of the present tasks' gradients, float64 (a copy the method may modify).
            step: The losses and task indices of the rows, and the rounding unit of the Gramian's dtype.

        Returns:
            ``(K',)`` float64 weights.
        """
        if type(self).gramian_weights is not GramianAggregator.gramian_weights:  # written against mtlzoo 0.1
            found = self.gramian_weights(torch.from_numpy(gramian), torch.from_numpy(step.losses))
            return found.detach().to(torch.float64).cpu().numpy()
        raise NotImplementedError(f"{type(self).__name__} should implement `weigh`.")

    def compute(self, inputs: StepInputs) -> Update:
        gramian = inputs.gramian
        assert gramian is not None
        matrix = to_host(gramian)
        if not math.isfinite(matrix.sum()) and not np.isfinite(matrix).all():
            return Update(weights=torch.full(gramian.shape[:1], math.nan, dtype=gramian.dtype, device=gramian.device))
        return Update(weights=from_host(self.weigh(matrix, HostStep.of(inputs, gramian.dtype)), gramian))

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the weights for a K x K Gramian (all K tasks present)."""
        if not all_finite(gramian):
            raise NonFiniteGradientError(f"{type(self).__name__}: the Gramian has non-finite entries (nan or inf).")
        dtype = compute_dtype(gramian.dtype)
        return from_host(self.weigh(to_host(gramian), HostStep.standalone(losses, dtype)), gramian.to(dtype))

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``J^T c`` for a (K, ...) matrix of task gradients and their K losses.

        Computed in float64 (weights can be large where rows cancel), returned in ``grads``' dtype.
        State staged here is committed by :meth:`advance` (call it after each optimizer step).
        """
        check_gradients(grads, losses, self)
        wide = grads.to(torch.float64)
        flat = flat_rows(wide)
        weights = self.gramian_weights(flat @ flat.T, losses)
        self.count_backward()
        return torch.tensordot(weights.to(torch.float64), wide, dims=1).to(grads.dtype)


class DirectionAggregator(Aggregator):
    """An aggregator that builds the update from the gradients themselves (not a weighting of them): :meth:`combine`."""

    statistic = "gradients"

    def combine(self, gradients: Tensor, inputs: StepInputs) -> Tensor:
        """The combined gradient, shaped like one row, for these finite ``(K', ...)`` task gradients."""
        raise NotImplementedError(f"{type(self).__name__} should implement `combine`.")

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        if not all_finite(grads):
            return Update(direction=torch.full_like(grads[0], math.nan))
        return Update(direction=self.combine(grads, inputs))

    def aggregate(self, grads: Tensor, losses: Tensor, representation: Tensor | None = None) -> Tensor:
        """Standalone: the combined gradient of a (K, ...) matrix of task gradients and their K losses.

        ``representation``: the ``z`` the gradients were taken at, for a method whose request reads it.
        """
        check_gradients(grads, losses, self)
        wide = grads.to(compute_dtype(grads.dtype))
        tasks = torch.arange(grads.shape[0], device=grads.device)
        inputs = StepInputs(losses.detach().to(wide.dtype), tasks, grads.shape[0], micro_batch=self.micro_batch,
                            gradients=wide, representation=representation)
        direction = self.combine(wide, inputs)
        self.count_backward()
        return direction.to(grads.dtype)


GradientSurgery = Aggregator
"""The former name of :class:`Aggregator`."""
GramianWeightedSurgery = GramianAggregator
"""The former name of :class:`GramianAggregator`."""
