"""The loss-weighting role: K losses to one scalar the model learns from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlzoo.linalg import widened
from mtlzoo.protocol import StepInputs
from mtlzoo.strategy import Strategy


class LossWeighting(Strategy):
    r"""A strategy that scalarises the K losses: ``total = f(L_1, ..., L_K)``.

    A subclass writes one method, :meth:`scalarize` (``f``, in the form its paper writes it); the base derives
    everything else from it, by autograd: the model learns from ``sum_k w_k L_k`` with ``w_k = d total / d L_k`` at this
    step, held constant (:meth:`weights`; ``w_k = 1/L_k`` for SI's ``f = sum_k log L_k``), and the strategy's own
    parameters (UW's log-variances) from ``total`` itself, the losses held constant (:meth:`loss_objective`).

    Weights that are not a function of the losses through ``f`` (random draws, learned or per-epoch
    weights) are written detached: ``(w.detach() * losses).sum()``. Inside :meth:`scalarize`,
    ``losses`` holds the present tasks' losses only (:meth:`present` picks the matching entries of a
    per-task tensor, :attr:`present_tasks` gives their indices), in their dtype, at least float32.
    """

    role = "weighting"
    _legacy_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the former surface: a subclass that writes only `weights(losses)` (its weights, detached)
        defines = {name for klass in cls.__mro__ if klass is not LossWeighting and issubclass(klass, LossWeighting)
                   for name in vars(klass)}
        cls._legacy_weights = "weights" in defines and "scalarize" not in defines

    def scalarize(self, losses: Tensor) -> Tensor:
        """The scalar ``f(L)`` this method minimises, differentiable in the losses and its own parameters."""
        if self._legacy_weights:
            return (self.weights(losses.detach()).detach().to(losses.dtype) * losses).sum()
        raise NotImplementedError(f"{type(self).__name__} should implement `scalarize(losses)`.")

    @contextmanager
    def _presenting(self, tasks: Tensor | None) -> Iterator[None]:
        previous = self.__dict__.get("_present")
        self.__dict__["_present"] = tasks
        try:
            yield
        finally:
            self.__dict__["_present"] = previous

    @property
    def present_tasks(self) -> Tensor | None:
        """The task indices of the losses being scalarised (``None``: all K, in order)."""
        tasks = self.__dict__.get("_present")
        return None if tasks is None or tasks.shape[0] == self.num_tasks else tasks

    def present(self, values: Tensor) -> Tensor:
        """``values[tasks]``: the entries of a per-task tensor (K, ...) for the tasks being scalarised."""
        tasks = self.present_tasks
        return values if tasks is None else values[tasks.to(values.device)]

    def of_present(self, values: Tensor, tasks: Tensor) -> Tensor:
        """``values[tasks]`` (``values`` itself when all tasks are present)."""
        return values if tasks.shape[0] == self.num_tasks else values[tasks.to(values.device)]

    def weights(self, losses: Tensor, tasks: Tensor | None = None) -> Tensor:
        """``w_k = d f / d L_k`` at these losses (of tasks ``tasks``, default all), detached, in their dtype."""
        losses = widened(losses.detach())
        with torch.enable_grad(), self._presenting(tasks):
            leaf = losses.requires_grad_()
            total = self.scalarize(leaf)
            (grad,) = torch.autograd.grad(total, leaf, allow_unused=True)
        return torch.zeros_like(losses) if grad is None else grad

    def loss_weights(self, inputs: StepInputs) -> Tensor | None:
        losses, tasks = inputs.losses, inputs.tasks
        if self._legacy_weights:  # the former surface: weights(losses), all K or the present ones
            weights = self.weights(losses.detach())
            return weights[tasks] if weights.shape[0] == self.num_tasks != losses.shape[0] else weights
        return self.weights(losses, tasks)

    def loss_objective(self, losses: Tensor, tasks: Tensor) -> Tensor | None:
        """``f`` at the (detached) losses: what the strategy's own parameters learn from (``None`` without any)."""
        if not any(parameter.requires_grad for parameter in self.parameters()):
            return None
        with torch.enable_grad(), self._presenting(tasks):
            total = self.scalarize(widened(losses.detach()))
        return total if total.requires_grad else None

    def scalarization(self, losses: Tensor, tasks: Tensor) -> Tensor:
        """``f`` at the step's live losses: the engine back-propagates it once (see :meth:`Strategy.scalarization`)."""
        with self._presenting(tasks):
            return self.scalarize(losses)

    def combine(self, losses: Tensor) -> Tensor:
        """``sum_k w_k L_k`` with the weights held constant: the scalar whose backward trains the model."""
        return (self.weights(losses).to(losses.dtype) * losses).sum()

    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Standalone: ``sum_k w_k g_k`` for K gradients (K x ...) and their losses."""
        weights = self.weights(losses).to(grads.dtype)
        return torch.tensordot(weights, grads, dims=1)


WeightingStrategy = LossWeighting
"""The former name of :class:`LossWeighting`."""
