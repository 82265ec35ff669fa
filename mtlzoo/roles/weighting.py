"""The loss-weighting role: K losses to one scalar the model learns from."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlzoo.protocol import StepInputs
from mtlzoo.strategy import Strategy
from mtlzoo.structure import trainable_parameters


class LossWeighting(Strategy):
    r"""A strategy that scalarises the K losses: ``total = f(L_1, ..., L_K)``.

    One definition of what the model learns, whichever path computes it: the model (backbone and
    heads) receives ``sum_k w_k dL_k/dθ`` with ``w_k = d total / d L_k`` evaluated at this step and
    held constant. For ``f = sum_k log L_k`` (SI) that is ``w_k = 1/L_k``. The strategy's own
    parameters (UW's log-variances) learn from ``total`` itself, with the losses held constant.

    Subclasses implement :meth:`scalarize` (the method's definition) and, where it has a closed
    form, :meth:`weights` (checked against autograd by the test suite); or only :meth:`weights`
    when the weights do not depend on the losses' values through ``f``.
    """

    role = "weighting"

    def scalarize(self, losses: Tensor) -> Tensor:
        """The scalar ``f(L)`` this method minimises (differentiable in the losses and own parameters)."""
        if type(self).weights is LossWeighting.weights:
            raise NotImplementedError(f"{type(self).__name__} should implement `scalarize` or `weights`.")
        return (self.weights(losses.detach()).detach() * losses).sum()

    def weights(self, losses: Tensor) -> Tensor:
        """``w_k = d f / d L_k`` at these losses, detached (by autograd unless a subclass has a closed form)."""
        if type(self).scalarize is LossWeighting.scalarize:
            raise NotImplementedError(f"{type(self).__name__} should implement `scalarize` or `weights`.")
        with torch.enable_grad():
            leaf = losses.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.scalarize(leaf), leaf)
        return grad

    def combine(self, losses: Tensor) -> Tensor:
        """``sum_k w_k L_k`` with the weights held constant: the scalar whose backward trains the model."""
        return (self.weights(losses.detach()).to(losses.dtype) * losses).sum()

    def loss_weights(self, inputs: StepInputs) -> Tensor:
        return self.task_weights_for(inputs.losses, inputs.tasks)

    def task_weights_for(self, losses: Tensor, tasks: Tensor) -> Tensor:
        """The weights of the present tasks ``tasks``, from their losses.

        By default :meth:`weights` of the present losses, indexed by ``tasks`` when it returns all K
        (a weighting whose weights are per-task state rather than a function of the losses).
        """
        weights = self.weights(losses)
        if weights.shape[0] == self.num_tasks and losses.shape[0] != self.num_tasks:
            return weights[tasks]
        return weights

    def of_present(self, values: Tensor, tasks: Tensor) -> Tensor:
        """``values[tasks]``: the per-task ``values`` (K,) of the present tasks (``values`` itself when all are)."""
        return values if tasks.shape[0] == self.num_tasks else values[tasks]

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        if not trainable_parameters(self):
            return None
        return self.scalarize(losses.detach())

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``sum_k w_k g_k`` for K gradients (K x ...) and their losses."""
        weights = self.weights(losses.detach()).to(grads.dtype)
        return torch.tensordot(weights, grads, dims=1)


WeightingStrategy = LossWeighting
"""The former name of :class:`LossWeighting`."""
