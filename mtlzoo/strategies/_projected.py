"""What MoDo, SDMGrad and MoCo share: task weights on the simplex carried from step to step, moved by projected
gradient steps, read from the task gradients of one or more independent batches of a step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from mtlzoo.errors import LossError, ShapeMismatchError
from mtlzoo.linalg import all_finite, flat_rows
from mtlzoo.protocol import Request, StepInputs, Update, reuse_batches
from mtlzoo.roles import Aggregator
from mtlzoo.roles.aggregator import check_gradients
from mtlzoo.strategy import Target


class ProjectedWeights(Aggregator):
    """Base of MoDo, SDMGrad and MoCo: the running task weights ``weights`` (``1/K`` each at first, a float64
    buffer), the Jacobians of the batches a step reads, and a standalone face that takes those batches.

    On the parameter target a step reads ``batches`` independent batches (``Request.batches``); on the representation
    target one (each batch's rows of ``dL_k/dz`` belong to its own samples, so products across batches are not defined).
    Every micro-batch of a step starts from the weights the step started with (the committed ones); the first one's
    result is kept. A task absent from a step keeps its weight; the present tasks' weights move on their own simplex.
    """

    statistic = "gradients"
    batches: ClassVar[int] = 1
    """Independent batches per step on the parameter target."""

    def __init__(self, num_tasks: int, *, target: Target | None = None) -> None:
        super().__init__(num_tasks, target=target)
        self.declare_state(weights=torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    @property
    def request(self) -> Request:
        return dataclasses.replace(super().request, batches=self.batches if self.target == "parameters" else 1)

    def update_from(self, jacobians: list[Tensor], tasks: np.ndarray, inputs: StepInputs) -> Update:
        """The update from the present tasks' ``(K', n)`` Jacobians, one per batch (the first is the batch the
        model learns from); ``tasks`` indexes the running state."""
        raise NotImplementedError

    def compute(self, inputs: StepInputs) -> Update:
        assert inputs.gradients is not None
        jacobians = self.jacobians(inputs)
        if not all_finite(*jacobians):
            return Update(direction=torch.full_like(inputs.gradients[0], math.nan))
        return self.update_from(jacobians, inputs.tasks.cpu().numpy(), inputs)

    def jacobians(self, inputs: StepInputs) -> list[Tensor]:
        """The rows of the first batch's present tasks, ``(K', n)``, in each batch the step reads."""
        reuse_batches(inputs, self.request.batches, self)
        found = []
        order = inputs.tasks.tolist()
        for batch in [inputs, *inputs.extra][:self.request.batches]:
            assert batch.gradients is not None
            gradients = batch.gradients
            if batch.tasks.tolist() != order:
                position = {task: row for row, task in enumerate(batch.tasks.tolist())}
                missing = [task for task in order if task not in position]
                if missing:
                    raise LossError(f"{type(self).__name__} reads every task of the first batch in each batch of the "
                                    f"step; tasks {missing} are absent from another batch (give None for a task in "
                                    "every batch of the step, or in none).")
                gradients = gradients[[position[task] for task in order]]
            found.append(flat_rows(gradients))
        return found

    def previous(self, tasks: np.ndarray) -> np.ndarray:
        """The present tasks' weights the step started with (float64, host)."""
        return self.state.committed("weights").detach().cpu().numpy().astype(np.float64)[tasks]

    def keep(self, weights: np.ndarray, tasks: np.ndarray) -> None:
        """Stage the present tasks' new weights (the absent ones keep theirs)."""
        self.state.write_rows("weights", tasks, weights)

    def aggregate(self, grads: Tensor, losses: Tensor, more_batches: Sequence[Tensor] = ()) -> Tensor:
        """Standalone: the update for the K task gradients ``grads`` (K x ...) of the losses ``losses``.

        ``more_batches``: the task gradients of the step's other independent batches, shaped as ``grads``
        (up to ``batches - 1``; fewer are filled with the given ones, with a warning). Computed in
        float64, returned in ``grads``' dtype; the state staged here is committed by :meth:`advance`.
        """
        check_gradients(grads, losses, self)
        if grads.shape[0] != self.num_tasks:
            raise ShapeMismatchError(f"{type(self).__name__} was built for {self.num_tasks} tasks; `grads` has "
                                     f"{grads.shape[0]} rows.")
        if len(more_batches) > self.request.batches - 1:
            raise ValueError(f"{type(self).__name__} reads {self.request.batches} batch(es) per step here; "
                             f"{len(more_batches) + 1} were given.")
        for more in more_batches:
            check_gradients(more, losses, self)
            if more.shape != grads.shape:
                raise ShapeMismatchError(f"Every batch's gradients should be shaped as `grads` {tuple(grads.shape)}. "
                                         f"Found {tuple(more.shape)}.")
        tasks = torch.arange(grads.shape[0], device=grads.device)
        values = losses.detach().to(torch.float64)

        def inputs(gradients: Tensor) -> StepInputs:
            return StepInputs(values, tasks, self.num_tasks, micro_batch=self.micro_batch,
                              gradients=gradients.to(torch.float64))

        step = inputs(grads)
        step.extra = [inputs(more) for more in more_batches]
        update = self.compute(step)
        self.count_backward()
        if update.direction is not None:
            return update.direction.to(grads.dtype)
        assert update.weights is not None
        return torch.tensordot(update.weights, step.gradients, dims=1).to(grads.dtype)
