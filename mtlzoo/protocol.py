"""What flows between the engine and a strategy in one training step.

A strategy declares a :class:`Request`: what it reads from a step. The engine (:mod:`mtlzoo.engine`) fulfils it by the
cheapest route it knows and hands the strategy a :class:`StepInputs`; the strategy answers with an :class:`Update`,
which the engine turns into gradients. Both sides are plain tensors, so a strategy is testable on random matrices and
the engine without any strategy.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mtlzoo.errors import ReusedBatchWarning

Where = Literal["losses", "representation", "parameters"]
Statistic = Literal["gradients", "gramian", "norms"]
Layer = Literal["last"]

WHERES: tuple[Where, ...] = ("losses", "representation", "parameters")
STATISTICS: tuple[Statistic, ...] = ("gradients", "gramian", "norms")
LAYERS: tuple[Layer, ...] = ("last",)


class _LastLayer:
    """The type of :data:`LAST_LAYER`: a named marker, not an empty tuple of names."""

    def __repr__(self) -> str:
        return "LAST_LAYER"


LAST_LAYER = _LastLayer()
"""``Request("parameters", ..., parameters=LAST_LAYER)`` is ``Request("parameters", ..., layer="last")``, kept
for existing callers: the last shared layer's weights, found by the engine from the graph of ``z``."""


@dataclass(frozen=True)
class Request:
    """What a strategy reads from one step, beyond the K loss values it always gets.

    Attributes:
        where: ``"losses"`` (nothing else: one ordinary backward), ``"representation"`` (per-task
            gradients ``g_k = dL_k/dz`` on the backbone output ``z``) or ``"parameters"`` (per-task
            gradients on the shared parameters, rows of the K x n Jacobian).
        statistic: What of those gradients: ``"gradients"`` (the K x ... matrix itself), the K x K
            ``"gramian"`` ``G G^T``, or the K ``"norms"`` ``||g_k||``.
        parameters: With ``where="parameters"``, the names of the shared parameters to take the
            gradients on (as ``backbone.named_parameters()`` gives them), or ``None`` for all of them
            (or for the layer named by ``layer``).
        layer: With ``where="parameters"``, ``"last"`` for the weights of the last shared layer, found
            by the engine from the graph of ``z`` (GradNorm's choice), so the strategy need not know
            the backbone's parameter names; ``None`` when ``parameters`` says.
        batches: From how many independent batches of the same step (SDMGrad reads 3, MoDo 2): the model
            learns from the first (``mtl.backward(losses, more_batches=[...])`` passes the others); given
            fewer, the given ones stand in for the missing (:func:`reuse_batches`).
        representation: With ``where="representation"``, also hand the strategy the (detached)
            representation ``z`` itself (``StepInputs.representation``: GradDrop's input sign).
    """

    where: Where = "losses"
    statistic: Statistic = "gradients"
    parameters: tuple[str, ...] | None = None
    layer: Layer | None = None
    batches: int = 1
    representation: bool = False

    def __post_init__(self) -> None:
        if self.where not in WHERES:
            raise ValueError(f"Parameter `where` should be one of {WHERES}. Found `where = {self.where!r}`.")
        if self.statistic not in STATISTICS:
            raise ValueError(f"Parameter `statistic` should be one of {STATISTICS}. "
                             f"Found `statistic = {self.statistic!r}`.")
        if isinstance(self.parameters, _LastLayer):
            object.__setattr__(self, "parameters", None)
            object.__setattr__(self, "layer", "last" if self.layer is None else self.layer)
        if self.layer is not None and (self.layer not in LAYERS or self.where != "parameters"
                                       or self.parameters is not None):
            raise ValueError(f"Parameter `layer` should be one of {LAYERS}, given with where='parameters' and no "
                             f"`parameters`. Found `layer = {self.layer!r}` with `where = {self.where!r}`, "
                             f"`parameters = {self.parameters!r}`.")
        if self.parameters is not None:
            if isinstance(self.parameters, str) or self.where != "parameters":
                raise ValueError("Parameter `parameters` should be a tuple of parameter names, given with "
                                 f"where='parameters'. Found `parameters = {self.parameters!r}` with "
                                 f"`where = {self.where!r}`.")
            object.__setattr__(self, "parameters", tuple(self.parameters))
            if not self.parameters:
                raise ValueError("Parameter `parameters` should be a non-empty tuple of parameter names. Found an "
                                 "empty tuple; for the last shared layer, give layer='last' instead.")
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"Parameter `batches` should be a positive int. Found `batches = {self.batches!r}`.")
        if self.batches > 1 and self.where == "losses":
            raise ValueError("Parameter `batches` should be 1 with where='losses' (several batches are read for their "
                             f"gradients). Found `batches = {self.batches!r}`.")
        if self.representation is not False and (self.representation is not True or self.where != "representation"):
            raise ValueError("Parameter `representation` should be True or False, True only with "
                             f"where='representation'. Found `representation = {self.representation!r}` with "
                             f"`where = {self.where!r}`.")

    @property
    def needs_gradients(self) -> bool:
        """Whether the step must compute per-task gradients (anything but ``where="losses"``)."""
        return self.where != "losses"

    def __repr__(self) -> str:
        layer = "" if self.layer is None else f", layer={self.layer!r}"
        representation = ", representation=True" if self.representation else ""
        return (f"Request(where={self.where!r}, statistic={self.statistic!r}, parameters={self.parameters!r}{layer}, "
                f"batches={self.batches!r}{representation})")

    def __str__(self) -> str:
        if self.where == "losses":
            return "losses"
        text = f"{self.statistic} on {self.where}"
        if self.layer == "last":
            text = f"{self.statistic} on the last shared layer"
        elif self.parameters is not None:
            text += f" {list(self.parameters)}"
        return text + (f" x{self.batches} batches" if self.batches > 1 else "")


@dataclass
class StepInputs:
    """What the engine hands a strategy for one backward: the present tasks' losses and statistics.

    Tasks absent from the step (a ``None`` loss) are left out: every tensor here has one row per
    present task, and ``tasks`` maps rows to task indices.

    Attributes:
        losses: The present tasks' losses, detached, shape ``(K',)``.
        tasks: Their task indices, a ``(K',)`` long tensor in increasing order.
        num_tasks: K, all tasks.
        micro_batch: Index of this backward within the optimizer step (0 for the first).
        gradients: ``(K', ...)`` per-task gradients, unscaled, at least float32 (``statistic="gradients"``).
        gramian: ``(K', K')`` Gramian of the gradients (``statistic="gramian"``).
        norms: ``(K',)`` norms of the gradients (``statistic="norms"``).
        extra: Statistics of the additional independent batches (``Request.batches > 1``), one ``StepInputs`` each, of
            their losses weighted by the step's loss weights ``w`` (1 for a task absent from this batch); the update
            applies to this batch. Always ``batches - 1`` of them inside a step (:func:`reuse_batches`).
        representation: The representation ``z`` the gradients were taken at, detached, shaped like one
            row of ``gradients`` (``Request(..., representation=True)``).
        host_losses: ``losses`` on the host, where the engine already read them (else ``None``).
        present: ``tasks`` on the host, likewise.
    """

    losses: Tensor
    tasks: Tensor
    num_tasks: int
    micro_batch: int = 0
    gradients: Tensor | None = None
    gramian: Tensor | None = None
    norms: Tensor | None = None
    extra: list[StepInputs] = field(default_factory=list)
    representation: Tensor | None = None
    host_losses: list[float] | None = None
    present: list[int] | None = None

    @property
    def all_present(self) -> bool:
        return self.losses.shape[0] == self.num_tasks


_REUSE_WARNED: weakref.WeakSet[object] = weakref.WeakSet()


def reuse_batches(inputs: StepInputs, batches: int, owner: object) -> None:
    """Fill ``inputs.extra`` up to ``batches - 1`` batches, the given batches standing in for the missing in turn.

    The strategy's products of independent estimates then become products of one estimate with itself (the bias its
    paper avoids): ``owner`` says so once, in a :class:`~mtlzoo.errors.ReusedBatchWarning`.
    """
    given = [inputs, *inputs.extra]
    if len(given) >= batches:
        return
    if owner not in _REUSE_WARNED:
        _REUSE_WARNED.add(owner)
        warnings.warn(f"{type(owner).__name__} reads {batches} independent batches per backward, {len(given)} "
                      f"given: the given batches stand in for the missing ones (its estimate is then biased). Pass "
                      f"the others with mtl.backward(losses, more_batches=[...]), each from a forward of its own. "
                      "Said once.", ReusedBatchWarning, stacklevel=3)
    inputs.extra += [dataclasses.replace(given[index % len(given)], extra=[]) for index in range(len(given), batches)]


@dataclass
class Update:
    """A strategy's answer for one backward; every field is optional.

    Attributes:
        weights: ``(K',)`` weights ``c`` of the task gradients: the shared part receives
            ``sum_k c_k g_k`` (the Gramian-weighted methods, and weightings on a gradient path).
        direction: The combined gradient itself, shaped like one row of ``StepInputs.gradients``
            (RotoGrad's ``dz``, PCGrad's projected sum). Overrides ``weights``.
        objective: A scalar whose backward gives the strategy's own parameters their gradients
            (RotoGrad's rotation objective, GradNorm's weight objective). It must not reach the model (build it from
            detached statistics): it joins the step's one final backward.
    """

    weights: Tensor | None = None
    direction: Tensor | None = None
    objective: Tensor | None = None


class StepWeights:
    """What one backward used, per task: the loss weights ``w`` and the gradient coefficients ``c``.

    The model learned from ``sum_k w_k L_k``; the shared part received ``sum_k c_k g_k`` with
    ``g_k`` the gradient of ``w_k L_k`` (so a loss weighting has ``c = 1`` and a Gramian-weighted
    surgery ``w = 1``). Read it from ``mtl.last_step`` after ``mtl.backward`` to log or plot it.
    Tensors are detached, on the losses' device, of length K in task order, ``NaN`` for a task
    absent from the step; they are formed when first read, so a step that nobody logs pays nothing.

    Attributes:
        loss_weights: ``(K,)`` the loss weights ``w`` (all ones when the strategy weighs nothing).
        coefficients: ``(K,)`` the coefficients ``c`` of the task gradients in the shared update, or ``None`` where the
            strategy's update was a combined gradient (a direction, as RotoGrad's) rather than coefficients.
        tasks: ``(K',)`` the present tasks' indices.
    """

    def __init__(self, loss_weights: Tensor | None, coefficients: Tensor | None, tasks: Tensor, num_tasks: int, *,
                 direction: bool = False) -> None:
        """From the present tasks' ``w`` and ``c`` (``None``: all ones), unless ``direction``: no ``c`` at all."""
        self._present = (None if loss_weights is None else loss_weights.detach(),
                         None if coefficients is None else coefficients.detach())
        self._direction = direction
        self.tasks = tasks
        self.num_tasks = num_tasks

    @property
    def loss_weights(self) -> Tensor:
        return self._spread(self._present[0])

    @property
    def coefficients(self) -> Tensor | None:
        return None if self._direction else self._spread(self._present[1])

    def _spread(self, values: Tensor | None) -> Tensor:
        dtype = next((v.dtype for v in self._present if v is not None), torch.float32)
        present = torch.ones(self.tasks.shape, dtype=dtype, device=self.tasks.device) if values is None \
            else values.to(dtype)
        if self.tasks.shape[0] == self.num_tasks:
            return present
        return present.new_full((self.num_tasks,), math.nan).index_copy(0, self.tasks, present)

    def __repr__(self) -> str:
        return f"StepWeights(loss_weights={self.loss_weights}, coefficients={self.coefficients})"
