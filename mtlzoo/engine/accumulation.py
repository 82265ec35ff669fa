"""Aggregation at the optimizer step (``aggregate_at="step"``; docs/concepts.md, "Aggregating at the step").

Each backward adds the (unweighted) losses' K x n Jacobian on the shared parameters and the loss values to a
:class:`StepBuffer`; ``mtl.step`` runs the step once on the sums: ``w`` from the summed losses, the statistic
from ``diag(w) J``, ``compute``, the update into the shared parameters' ``.grad`` (head ``k``'s gradient brought
to ``w_k c_k`` times its sum where the strategy weights the heads), then the optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.engine.forwards import PendingForwards
from mtlzoo.engine.heads import HeadPass, head_pass
from mtlzoo.engine.jacobian import JacobianRoute, jacobian_blocks
from mtlzoo.engine.last_layer import last_layer_weights
from mtlzoo.engine.lifecycle import StepTracker
from mtlzoo.engine.step import accumulate, head_owners, objective_gradients, scaler_of, shared_parameters, sum_or_none
from mtlzoo.engine.update import covers_representation, shared_update
from mtlzoo.errors import BackwardOrderError, DistributedError, InvalidModelError, NonFiniteGradientError
from mtlzoo.linalg import all_finite, autocast_off, compute_dtype, gramian, row_norms
from mtlzoo.losses import StepLosses
from mtlzoo.protocol import Request, StepInputs, StepWeights, reuse_batches
from mtlzoo.strategy import Strategy
from mtlzoo.structure import trainable_parameters

AGGREGATE_AT = ("backward", "step")
"""The values of ``MTLWrapper(aggregate_at=...)``."""


@dataclass
class _Batch:
    """One independent batch's sums over the micro-batches: the Jacobian (K x n, unscaled), losses, who was present."""

    jacobian: Tensor
    losses: Tensor
    present: Tensor

    def add(self, rows: Tensor, losses: StepLosses) -> None:
        tasks = losses.tasks.to(self.jacobian.device)
        self.jacobian.index_add_(0, tasks, rows.to(self.jacobian.dtype))
        self.losses.index_add_(0, tasks, losses.values.detach().to(self.losses.dtype))
        self.present[tasks] = True

    def inputs(self, num_tasks: int, weights: Tensor | None) -> tuple[StepInputs, Tensor]:
        """What the strategy reads of this batch, and its present tasks' rows of ``diag(w) J``."""
        tasks = self.present.nonzero().squeeze(1)
        rows = self.jacobian[tasks]
        if weights is not None:
            rows = rows * weights.to(rows.dtype).unsqueeze(1)
        return StepInputs(self.losses[tasks], tasks, num_tasks, present=tasks.tolist()), rows


class StepBuffer:
    """The sums of one optimizer step's micro-batches that the step's aggregation reads (``aggregate_at="step"``).

    Memory: ``batches x K x n`` numbers in the shared parameters' dtype (at least float32), ``n`` the
    shared parameters' count and ``batches`` the independent batches the strategy reads (1 but for
    SDMGrad and MoDo), plus one copy of the heads' gradients.

    Args:
        strategy: The wrapper's strategy: one whose request reads gradients on the shared parameters.

    Raises:
        ValueError: The strategy reads the losses only or gradients on the representation.
    """

    def __init__(self, strategy: Strategy) -> None:
        request = strategy.request
        if request.where != "parameters":
            reads = "the losses only (its step is linear in the losses: accumulation is already its whole batch's " \
                "step where its weights do not depend on the micro-batch)" if request.where == "losses" else \
                "gradients on the representation z, whose rows are per sample and cannot be summed over micro-batches"
            raise ValueError(f"aggregate_at='step' sums the per-task gradients on the shared parameters over the "
                             f"micro-batches; {type(strategy).__name__} reads {reads}. Use aggregate_at='backward' "
                             "(the default), or the strategy's target='parameters' where it has one.")
        self.clear()

    def clear(self) -> None:
        """Forget the step's micro-batches."""
        self.batches: list[_Batch] = []
        self.params: list[Tensor] = []
        self.read: list[Tensor] = []
        self.head_params: list[Tensor] = []
        self.head_sums: list[Tensor] = []
        self.scale: Tensor | None = None
        self.overflow = False

    @property
    def empty(self) -> bool:
        return not self.batches

    def refuse_saving(self, *_: Any) -> None:
        """A ``state_dict`` pre-hook: no checkpoint between the micro-batches of a step."""
        if not self.empty:
            raise BackwardOrderError("A checkpoint was asked for between the micro-batches of a step with "
                                     "aggregate_at='step': the step's summed per-task gradients (K x n) are not "
                                     "saved. Save after mtl.step(optimizer).")

    # ------------------------------------------------------------------ a micro-batch
    def add(self, strategy: Strategy, pending: PendingForwards, heads: nn.Module, backbone: nn.Module,
            losses: StepLosses, extra_losses: Sequence[StepLosses], *, tracker: StepTracker, active: bool,
            backbone_loss: Tensor | None, scaler: Any | None, retain_graph: bool, chunk_size: int | None,
            route: JacobianRoute) -> None:
        """One micro-batch: its Jacobians and losses summed here, the heads' gradients of ``sum_k L_k`` (and the
        backbone's own loss) into ``.grad``. Nothing is written when it raises.

        Raises:
            DistributedError: Under ``torch.distributed`` (``active``).
            BackwardOrderError: A plain ``optimizer.step()`` ran since the last backward (the buffer is dropped).
            InvalidModelError: The representation depends on tensors other than the backbone's parameters, or
                the losses read the backbone's extra outputs.
        """
        if active:
            raise DistributedError("aggregate_at='step' is not available under torch.distributed: the engine makes "
                                   "each backward's Jacobian global, and the step's aggregation would need the "
                                   "heads' gradients reduced again by hand. Use aggregate_at='backward'.")
        if tracker.moved():
            strategy.discard()
            tracker.close()
            self.clear()
            raise BackwardOrderError("With aggregate_at='step' the shared parameters' gradient is formed by "
                                     "mtl.step(optimizer): a plain optimizer.step() ran since the last backward and "
                                     "stepped without it. Its micro-batches are dropped; call mtl.step(optimizer).")
        self._forget_if_zeroed()
        scale = None
        if scaler is not None and scaler.is_enabled():
            scale = scaler.scale(torch.ones((), device=losses.values.device))
        scaled = scaler_of(scale)
        request = strategy.request
        head_params = trainable_parameters(heads)
        with autocast_off(losses.values.device.type):
            passed = head_pass(pending.records, scaled(losses.values), losses.tasks, losses.requires_grad,
                               head_params, labels=losses.labels, retain_graph=retain_graph)
            if passed.extra_roots:
                raise InvalidModelError("aggregate_at='step' does not take losses that read the backbone's extra "
                                        "outputs (their gradient would need every micro-batch's graph at the step): "
                                        "use aggregate_at='backward'.")
            params = shared_parameters(backbone, None, strategy)
            zs = [record.z for record in passed.records]
            if not covers_representation(zs, params):
                raise InvalidModelError("With aggregate_at='step' the update reaches the shared part through the "
                                        "Jacobian on the backbone's parameters, but the representation depends on "
                                        "other tensors too (a weight tied to a head, an input that requires grad): "
                                        "use aggregate_at='backward'.")
            read = self._read(request, backbone, strategy, zs, params)
            rows = [_jacobian(passed, params, scale, chunk_size, route)]
            consumed = list(passed.records)
            for more in extra_losses:
                extra = head_pass(pending.records, scaled(more.values), more.tasks, more.requires_grad, head_params,
                                  labels=more.labels)
                rows.append(_jacobian(extra, params, scale, chunk_size, route))
                consumed += extra.records
            if scale is None and not all_finite(*rows):
                raise NonFiniteGradientError(
                    "The task gradients on the shared parameters are not finite (from finite losses). Nothing was "
                    "back-propagated; scale the losses down, or train under torch.amp with a GradScaler.")
        if self.empty:
            self.params, self.read, self.scale = params, read, scale
        self.overflow = self.overflow or (scale is not None and not all_finite(*rows, *passed.head_grads))
        for index, (found, batch_losses) in enumerate(zip(rows, [losses, *extra_losses])):
            if index == len(self.batches):
                self.batches.append(_Batch(found.new_zeros(strategy.num_tasks, found.shape[1]),
                                           found.new_zeros(strategy.num_tasks,
                                                           dtype=compute_dtype(batch_losses.values.dtype)),
                                           torch.zeros(strategy.num_tasks, dtype=torch.bool, device=found.device)))
            self.batches[index].add(found, batch_losses)
        self._add_heads(passed)
        roots = passed.head_params + ([] if backbone_loss is None else [scaled(backbone_loss)])
        accumulate(roots, [*passed.head_grads, *([None] if backbone_loss is not None else [])],
                   retain_graph=retain_graph)
        if not retain_graph:
            pending.remove(consumed)
        tracker.backward_done(losses.present)

    def _read(self, request: Request, backbone: nn.Module, strategy: Strategy, zs: list[Tensor],
              params: list[Tensor]) -> list[Tensor]:
        """The shared parameters the request reads: all, a named subset, or the last layer's weights."""
        if request.layer == "last":
            read = last_layer_weights(zs[0])
        elif request.parameters is not None:
            read = shared_parameters(backbone, request.parameters, strategy)
        else:
            return params
        known = {id(p) for p in params}
        if not all(id(p) in known for p in read):
            raise InvalidModelError(f"{type(strategy).__name__} reads parameters that are not trainable parameters "
                                    "of the backbone; aggregate_at='step' needs them among those.")
        return read

    def _add_heads(self, passed: HeadPass) -> None:
        sums = {id(p): index for index, p in enumerate(self.head_params)}
        for param, grad in zip(passed.head_params, passed.head_grads):
            if id(param) in sums:
                self.head_sums[sums[id(param)]] = self.head_sums[sums[id(param)]] + grad
            else:
                self.head_params.append(param)
                self.head_sums.append(grad.detach().clone())

    def _forget_if_zeroed(self) -> None:
        """``optimizer.zero_grad()`` since the last backward (a head's ``.grad`` is ``None`` again) drops the step's
        earlier micro-batches, as it drops their gradients in ``.grad``."""
        if any(param.grad is None for param in self.head_params):
            self.clear()

    # ------------------------------------------------------------------ the step
    def write(self, strategy: Strategy, heads: nn.Module) -> StepWeights | None:
        """Aggregate the step's sums once and write the update into ``.grad``; what the step used (``None`` when no
        micro-batch is buffered). On an error nothing is written, the buffer and the staged state are dropped."""
        self._forget_if_zeroed()
        if self.empty:
            return None
        try:
            with autocast_off(self.batches[0].jacobian.device.type):
                return self._write(strategy, heads)
        except BaseException:
            strategy.discard()
            self.clear()
            raise

    def _write(self, strategy: Strategy, heads: nn.Module) -> StepWeights:
        request, num_tasks, scaled = strategy.request, strategy.num_tasks, scaler_of(self.scale)
        sizes = [p.numel() for p in self.params]
        if self.overflow:  # the plain sum, not finite: the scaler skips the step
            first = self.batches[0]
            total = first.jacobian.sum(0)
            accumulate(self.params, [scaled(piece).view_as(p).to(p.dtype)
                                     for piece, p in zip(total.split(sizes), self.params)])
            return StepWeights(None, None, first.present.nonzero().squeeze(1), num_tasks)
        inputs, _ = self.batches[0].inputs(num_tasks, None)
        weights = strategy.loss_weights(inputs)
        if weights is not None:
            weights = weights.to(inputs.losses.dtype)
        objective = strategy.loss_objective(inputs.losses, inputs.tasks)
        inputs, jacobian = self.batches[0].inputs(num_tasks, weights)
        self._statistic(request, self._columns(jacobian), inputs)
        every = None if weights is None else weights.new_ones(num_tasks).index_copy(0, inputs.tasks, weights)
        for batch in self.batches[1:]:  # the step's loss weights hold for its other batches too
            tasks = batch.present.nonzero().squeeze(1)
            extra, rows = batch.inputs(num_tasks, None if every is None else every[tasks])
            self._statistic(request, self._columns(rows), extra)
            inputs.extra.append(extra)
        reuse_batches(inputs, request.batches, strategy)
        update = strategy.compute(inputs)
        if update.direction is not None:
            _, flat = shared_update(update, jacobian, request, None, self.read)
            targets = self.read
        else:
            _, flat = shared_update(update, jacobian, request, list(jacobian.split(sizes, dim=1)), self.params)
            targets = self.params
        assert flat is not None
        own = sum_or_none(objective, update.objective)
        own_params, own_grads = objective_gradients(own, strategy, self.scale) \
            if own is not None and own.requires_grad else ([], [])
        head_grads = self._head_corrections(strategy, heads, inputs.tasks, weights, update.weights)
        if self.scale is None and not all_finite(*flat, *own_grads, *(g for g in head_grads if g is not None)):
            raise NonFiniteGradientError(
                f"{type(strategy).__name__} produced non-finite gradients at the step from finite losses (the task "
                f"gradients reach {float(jacobian.abs().max()):.3g} in magnitude). Nothing was written; scale the "
                "losses down, or train under torch.amp with a GradScaler.")
        roots = [*targets, *self.head_params, *own_params]
        grads = [*(scaled(piece).to(p.dtype) for piece, p in zip(flat, targets)),
                 *(None if g is None else g.to(p.dtype) for g, p in zip(head_grads, self.head_params)), *own_grads]
        kept = [(root, grad) for root, grad in zip(roots, grads) if grad is not None]
        accumulate([root for root, _ in kept], [grad for _, grad in kept])
        return StepWeights(weights, update.weights, inputs.tasks, num_tasks, direction=update.direction is not None)

    def _columns(self, rows: Tensor) -> Tensor:
        """The columns of the parameters the request reads (all of them, or a named subset or layer)."""
        if len(self.read) == len(self.params):
            return rows
        offsets, start = {}, 0
        for param in self.params:
            offsets[id(param)] = (start, param.numel())
            start += param.numel()
        return torch.cat([rows.narrow(1, *offsets[id(param)]) for param in self.read], dim=1)

    @staticmethod
    def _statistic(request: Request, rows: Tensor, inputs: StepInputs) -> None:
        """Fill ``inputs`` with the requested statistic of the rows of ``diag(w) J`` (on the parameters read)."""
        if request.statistic == "gramian":
            inputs.gramian = gramian(rows)
        elif request.statistic == "norms":
            inputs.norms = row_norms(rows)
        else:
            inputs.gradients = rows

    def _head_corrections(self, strategy: Strategy, heads: nn.Module, tasks: Tensor, weights: Tensor | None,
                          coefficients: Tensor | None) -> list[Tensor | None]:
        """What head ``k``'s ``.grad`` still needs to hold ``w_k c_k`` (``c_k`` where the strategy weights the heads)
        times its sum of the micro-batches' gradients: ``(w_k c_k - 1)`` times that sum; ``None`` where nothing."""
        factor = torch.ones(tasks.shape, dtype=torch.float64, device=tasks.device)
        if weights is not None:
            factor = factor * weights.to(factor)
        if strategy.weighted_heads and coefficients is not None:
            factor = factor * coefficients.to(factor)
        if weights is None and not (strategy.weighted_heads and coefficients is not None):
            return [None] * len(self.head_params)
        owners = head_owners(heads)
        of_task = dict(zip(tasks.tolist(), (factor - 1).tolist()))
        return [None if id(p) not in owners or owners[id(p)] not in of_task else total * of_task[owners[id(p)]]
                for p, total in zip(self.head_params, self.head_sums)]


def _jacobian(passed: HeadPass, params: list[Tensor], scale: Tensor | None, chunk_size: int | None,
              route: JacobianRoute) -> Tensor:
    """The micro-batch's K' x n Jacobian on ``params``, unscaled, in at least float32."""
    blocks, matrix = jacobian_blocks([record.z for record in passed.records], passed.grads, params,
                                     chunk_size=chunk_size, route=route)
    if matrix is None:
        matrix = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    dtype = compute_dtype(matrix.dtype)
    return matrix.to(dtype) if scale is None else matrix.to(dtype) / scale.to(dtype)


def check_aggregate_at(value: Any) -> str:
    """``value`` if it is one of :data:`AGGREGATE_AT`, else a ``ValueError`` naming the option."""
    if value not in AGGREGATE_AT:
        raise ValueError(f"Parameter `aggregate_at` should be one of {AGGREGATE_AT}. Found `aggregate_at = {value!r}`.")
    return value


__all__ = ["AGGREGATE_AT", "StepBuffer", "check_aggregate_at"]
