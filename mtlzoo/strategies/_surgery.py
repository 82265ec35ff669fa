"""What the gradient-surgery aggregators share: one path from a step (or a matrix) to their maths.

- :class:`GramianSurgery`: an aggregator whose update is ``sum_k c_k g_k`` with ``c`` read from the
  K x K Gramian (MGDA, UPGrad, PCGrad, ...). Subclasses write :meth:`GramianSurgery.host_weights`
  (the K x K maths on the host, in float64 numpy: the Gramian crosses to the host once per step,
  the weights come back as one tensor) or :meth:`GramianSurgery.weights_for` (on tensors).
- :class:`DirectionSurgery`: an aggregator that builds the update from the gradients themselves
  (GradDrop's element-wise masks). Subclasses write :meth:`DirectionSurgery.direction_for`.
- :class:`SeededGenerator`: the random stream of a stochastic aggregator, drawn from torch's
  generator at construction (deterministic given the seed) and saved in ``state_dict()``.

Both bases take the statistic in at least float32, and on a non-finite one answer with a
non-finite update inside a step (so that the engine raises :class:`~mtlzoo.errors.NonFiniteGradientError`,
or under a ``GradScaler`` lets the scaler skip the step) and raise that error standalone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlzoo.errors import NonFiniteGradientError
from mtlzoo.linalg import all_finite, compute_dtype, flat_rows
from mtlzoo.protocol import StepInputs, Update
from mtlzoo.roles.aggregator import GradientSurgery, GramianWeightedSurgery
from mtlzoo.solvers import from_host, to_host


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


class GramianSurgery(GramianWeightedSurgery):
    """Base of the Gramian-weighted aggregators: weights ``c`` from ``G = J J^T``, update ``J^T c``.

    Inside a step the engine hands the Gramian of the present tasks; standalone,
    :meth:`aggregate` forms it from the K x n matrix (in at least float32). Running state (staged
    by a backward, committed by ``advance()``) is the subclasses' business; ``inputs.tasks``
    tells them which tasks are present.
    """

    def host_weights(self, matrix: np.ndarray, eps: float, losses: Tensor, tasks: Tensor,
                     micro_batch: int) -> np.ndarray:
        """The weights of the present tasks for this finite Gramian, on the host.

        ``matrix`` is the Gramian as a float64 numpy array (a copy the method may modify), ``eps``
        the rounding unit of the dtype it was computed in; the K weights are returned as a float64
        array (the base class makes them one tensor of the Gramian's dtype and device).
        """
        raise NotImplementedError

    def weights_for(self, gramian: Tensor, losses: Tensor, tasks: Tensor, micro_batch: int) -> Tensor:
        """The weights of the present tasks for this (finite) Gramian (by default :meth:`host_weights`)."""
        return from_host(self.host_weights(to_host(gramian), torch.finfo(gramian.dtype).eps, losses, tasks,
                                           micro_batch), gramian)

    def compute(self, inputs: StepInputs) -> Update:
        gramian = inputs.gramian
        assert gramian is not None
        if type(self).host_weights is not GramianSurgery.host_weights:  # one transfer, checked on the host
            matrix = to_host(gramian)
            if not math.isfinite(matrix.sum()) and not np.isfinite(matrix).all():
                return Update(weights=torch.full(gramian.shape[:1], math.nan, dtype=gramian.dtype,
                                                 device=gramian.device))
            weights = self.host_weights(matrix, torch.finfo(gramian.dtype).eps, inputs.losses, inputs.tasks,
                                        inputs.micro_batch)
            return Update(weights=from_host(weights, gramian))
        if not all_finite(gramian):
            return Update(weights=torch.full(gramian.shape[:1], math.nan, dtype=gramian.dtype, device=gramian.device))
        return Update(weights=self.weights_for(gramian, inputs.losses, inputs.tasks, inputs.micro_batch))

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the weights for a K x K Gramian (all K tasks present)."""
        if not all_finite(gramian):
            raise NonFiniteGradientError(f"{type(self).__name__}: the Gramian has non-finite entries (nan or inf).")
        tasks = torch.arange(gramian.shape[0], device=gramian.device)
        return self.weights_for(gramian.to(compute_dtype(gramian.dtype)), losses.detach(), tasks, self.micro_batch)

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``J^T c`` for a (K, ...) matrix of task gradients and their K losses.

        The Gramian and the combination are computed in float64 (weights can be large where rows
        cancel), the result returned in ``grads``' dtype. State that a stateful method stages here
        is committed by :meth:`advance` (call it after each optimizer step); a stochastic one draws
        from its own generator.
        """
        check_gradients(grads, losses, self)
        wide = grads.to(torch.float64)
        flat = flat_rows(wide)
        weights = self.gramian_weights(flat @ flat.T, losses)
        self.micro_batch += 1
        return torch.tensordot(weights.to(torch.float64), wide, dims=1).to(grads.dtype)


class DirectionSurgery(GradientSurgery):
    """Base of the aggregators that build the update from the gradients themselves (not a weighting)."""

    def direction_for(self, grads: Tensor, losses: Tensor, tasks: Tensor, micro_batch: int) -> Tensor:
        """The combined gradient (shaped like one row) for these finite task gradients."""
        raise NotImplementedError

    def compute(self, inputs: StepInputs) -> Update:
        grads = inputs.gradients
        assert grads is not None
        if not all_finite(grads):
            return Update(direction=torch.full_like(grads[0], math.nan))
        return Update(direction=self.direction_for(grads, inputs.losses, inputs.tasks, inputs.micro_batch))

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: the combined gradient of a (K, ...) matrix of task gradients and their K losses."""
        check_gradients(grads, losses, self)
        tasks = torch.arange(grads.shape[0], device=grads.device)
        direction = self.direction_for(grads.to(compute_dtype(grads.dtype)), losses.detach(), tasks, self.micro_batch)
        self.micro_batch += 1
        return direction.to(grads.dtype)


class SeededGenerator:
    """The random stream of one stochastic strategy: a CPU ``torch.Generator`` and its saved state.

    Seeded at construction by ``seed``, or by a number drawn from torch's global generator (so a
    run is deterministic given ``torch.manual_seed``). A step draws from a working copy of the
    committed state; :meth:`commit` (at ``advance()``) makes the copy's state the committed one and
    :meth:`rewind` (a step the ``GradScaler`` skipped) forgets it, so ``state_dict()`` holds the
    state at the last step boundary and a skipped step draws nothing.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)
        self._working: torch.Generator | None = None

    def begin(self) -> torch.Generator:
        """The generator this step draws from (a copy of the committed state, made at its first draw)."""
        if self._working is None:
            if hasattr(self.generator, "clone_state"):  # torch >= 2.4: one copy of the state
                self._working = self.generator.clone_state()
            else:
                self._working = torch.Generator()
                self._working.set_state(self.generator.get_state())
        return self._working

    def on_device(self, device: torch.device) -> torch.Generator:
        """A generator on ``device`` seeded from this stream (the stream itself on the CPU)."""
        generator = self.begin()
        if device.type == "cpu":
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return torch.Generator(device=device).manual_seed(seed)

    def commit(self) -> None:
        if self._working is not None:
            self.generator = self._working  # the working copy becomes the committed stream (no copy)
        self._working = None

    def rewind(self) -> None:
        self._working = None

    def state(self) -> bytes:
        return bytes(self.generator.get_state().tolist())

    def load(self, state: Any) -> None:
        self.generator.set_state(torch.tensor(list(state), dtype=torch.uint8))
        self._working = None
