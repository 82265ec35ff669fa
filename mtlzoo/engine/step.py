"""One backward of a training step (:func:`backpropagate`): the strategy's request fulfilled, its update applied.

Nothing reaches ``.grad`` before the step's one final ``torch.autograd.backward`` (:func:`accumulate`), so an error
anywhere leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.engine.collectives import current, reduced_backbone_loss, reduced_host, reduced_values
from mtlzoo.engine.forwards import MarkedForward, PendingForwards
from mtlzoo.engine.heads import HeadPass, head_pass, split_batches
from mtlzoo.engine.internals import marked_leaves_reached
from mtlzoo.engine.jacobian import JacobianRoute
from mtlzoo.engine.last_layer import last_layer_update, last_layer_weights
from mtlzoo.engine.leading_linear import leading_linear
from mtlzoo.engine.statistics import Statistics, statistics
from mtlzoo.engine.update import covers_representation, shared_update
from mtlzoo.errors import BackwardOrderError, InvalidModelError, NonFiniteGradientError
from mtlzoo.linalg import all_finite, autocast_off, widened
from mtlzoo.losses import StepLosses
from mtlzoo.protocol import StepInputs, StepWeights, Update, reuse_batches
from mtlzoo.strategy import Strategy
from mtlzoo.structure import trainable_parameters


def backpropagate(strategy: Strategy, pending: PendingForwards, heads: nn.Module, backbone: nn.Module,
                  losses: StepLosses, inputs: StepInputs, *, backbone_loss: Tensor | None = None,
                  extra_losses: Sequence[StepLosses] = (), scale: Tensor | None = None,
                  retain_graph: bool = False, chunk_size: int | None = None,
                  route: JacobianRoute | None = None) -> StepWeights:
    """Back-propagate one backward's checked losses through ``strategy`` into the model and the strategy.

    Args:
        strategy: The strategy; its request says what the engine computes.
        pending: The training forwards not yet consumed; those the losses reach are consumed.
        heads: The task heads (their parameters get the gradients of the weighted losses).
        backbone: The shared part (its parameters are the shared parameters a request may name).
        losses: The present tasks' losses, checked.
        inputs: What the strategy reads, filled here with the requested statistics.
        backbone_loss: The backbone's own loss, if any.
        extra_losses: The losses of the other independent batches a request may read.
        scale: A ``GradScaler``'s scale: everything that reaches ``.grad`` is multiplied by it, and
            the statistics are divided by it; an overflowing step gives up the strategy's update.
        retain_graph: Keep the graphs for another backward.
        chunk_size: Tasks per vmapped backward when the Jacobian is formed (``None``: all at once).
        route: The wrapper's memory of how its backbone's Jacobian can be formed (a vmap failure).

    Returns:
        What the step used: the loss weights and the coefficients of the task gradients.
    """
    request = strategy.request
    if not request.needs_gradients:
        consumed_marks = marked_forwards(pending, losses)
        used = losses_step(strategy, losses, inputs, backbone_loss, scale, retain_graph)
        if not retain_graph:
            pending.remove(consumed_marks)
        return used
    weights, backbone_loss, objective = loss_weights(strategy, losses, inputs, backbone_loss)
    scaled = scaler_of(scale)

    head_params = trainable_parameters(heads)
    weighted = losses.values if weights is None else losses.values * weights
    passed = head_pass(pending.records, scaled(weighted), inputs.tasks, losses.requires_grad, head_params,
                       labels=losses.labels, retain_graph=retain_graph or current().sharded)
    if request.where != "parameters":
        shared = []
    elif request.layer == "last":  # found from the graph of z
        shared = last_layer_weights(passed.records[0].z)
    else:
        shared = shared_parameters(backbone, request.parameters, strategy)
    head_weights = _leading_weights(heads, losses.present, strategy) \
        if request.layer == "last" and request.statistic == "norms" else ()
    stats = statistics(request, passed, shared, inputs, scale, chunk_size=chunk_size, head_weights=head_weights,
                       route=route)
    overflow = scale is not None and not all_finite(stats.rep)
    consumed = list(passed.records)
    every = None if weights is None or not extra_losses else torch.ones(
        inputs.num_tasks, dtype=weights.dtype, device=weights.device).index_copy(0, inputs.tasks, weights)
    for more in extra_losses:  # the step's loss weights w hold for its other batches too
        extra = StepInputs(widened(reduced_values(more)), more.tasks, inputs.num_tasks, micro_batch=inputs.micro_batch,
                           host_losses=reduced_host(more), present=more.present)
        values = more.values if every is None else more.values * every[more.tasks]
        extra_passed = head_pass(pending.records, scaled(values), more.tasks, more.requires_grad,
                                 head_params, labels=more.labels)
        extra_rep = statistics(request, extra_passed, shared, extra, scale, chunk_size=chunk_size, route=route).rep
        overflow = overflow or (scale is not None and not all_finite(extra_rep))
        inputs.extra.append(extra)
        consumed += extra_passed.records
    if scale is not None:
        overflow = current().any(overflow)
    used = apply_update(strategy, inputs, passed, shared, stats, weights=weights, objective=objective,
                        backbone_loss=backbone_loss, overflow=overflow, scale=scale, retain_graph=retain_graph,
                        head_owners=head_owners(heads) if strategy.weighted_heads else None)
    if not retain_graph:
        pending.remove(consumed)
    return used


def head_owners(heads: nn.Module) -> dict[int, int]:
    """The task index of each head parameter (by ``id``); a parameter shared by two heads is refused."""
    modules = list(heads.values()) if isinstance(heads, nn.ModuleDict) else list(heads)
    owners: dict[int, int] = {}
    for task, head in enumerate(modules):
        for param in head.parameters():
            if owners.setdefault(id(param), task) != task:
                raise InvalidModelError(
                    f"Heads {owners[id(param)]} and {task} share a parameter, so it cannot be weighted by one task's "
                    "coefficient (the strategy's weighted_heads=True): build the strategy with weighted_heads=False.")
    return owners


def weigh_heads(passed: HeadPass, coefficients: Tensor, tasks: Tensor, owners: dict[int, int]) -> list[Tensor]:
    """The heads' gradients with head k's scaled by ``c_k``: the heads learn from ``sum_k c_k w_k L_k``."""
    row_of = {task: row for row, task in enumerate(tasks.tolist())}
    values = coefficients.tolist()
    return [grad * values[row_of[owners[id(param)]]] if id(param) in owners else grad
            for param, grad in zip(passed.head_params, passed.head_grads)]


def transaction(strategy: Strategy, losses: StepLosses, scaler: Any | None,
                body: Callable[[StepInputs, Tensor | None], StepWeights]) -> StepWeights:
    """One backward as a transaction: ``body(inputs, scale)`` runs with autocast off (the strategy's maths in
    full precision); if it raises, the step's first backward drops what it staged; else the micro-batch counts.

    Args:
        strategy: The strategy of the step.
        losses: The checked losses.
        scaler: A ``GradScaler`` (its scale multiplies what reaches ``.grad``), or ``None``.
        body: The backward itself, given what the strategy reads and the scale.
    """
    scale = None
    if scaler is not None and scaler.is_enabled():
        scale = scaler.scale(torch.ones((), device=losses.values.device))
    inputs = StepInputs(widened(reduced_values(losses)), losses.tasks, strategy.num_tasks,
                        micro_batch=strategy.micro_batch, host_losses=reduced_host(losses), present=losses.present)
    try:
        with autocast_off(losses.values.device.type):
            used = body(inputs, scale)
    except BaseException:
        if strategy.micro_batch == 0:
            strategy.discard()
        raise
    strategy.count_backward()
    return used


def losses_step(strategy: Strategy, losses: StepLosses, inputs: StepInputs, backbone_loss: Tensor | None,
                scale: Tensor | None, retain_graph: bool) -> StepWeights:
    """The step of a strategy that reads the losses only: its scalarization, or ``sum_k w_k L_k`` and its
    objective where it has none."""
    # under torch.distributed the weights come from the whole batch's losses, not from this rank's graph
    used = None if current().active else scalarized(strategy, losses, inputs, backbone_loss, scale, retain_graph)
    if used is not None:
        return used
    weights, backbone_loss, objective = loss_weights(strategy, losses, inputs, backbone_loss)
    return losses_only(losses, inputs, weights, objective, backbone_loss, scale, retain_graph)


def scaler_of(scale: Tensor | None) -> Callable[[Tensor], Tensor]:
    """Multiplies by a ``GradScaler``'s scale (the identity without one)."""
    return (lambda t: t) if scale is None else (lambda t: t * scale.to(t.dtype))


def loss_weights(strategy: Strategy, losses: StepLosses, inputs: StepInputs, backbone_loss: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The strategy's loss weights ``w`` (in the losses' dtype), the weighted backbone loss, and the strategy's
    loss objective (the gradient of its own parameters), for one backward."""
    weights = strategy.loss_weights(inputs)
    if weights is not None:
        weights = weights.to(losses.values.dtype)
    read = reduced_backbone_loss(losses, backbone_loss)
    if read is not None:
        backbone_weight = strategy.backbone_loss_weight(read)
        if backbone_weight is not None and backbone_loss is not None:
            backbone_loss = backbone_loss * backbone_weight
    return weights, backbone_loss, strategy.loss_objective(inputs.losses, inputs.tasks)


def scalarized(strategy: Strategy, losses: StepLosses, inputs: StepInputs, backbone_loss: Tensor | None,
               scale: Tensor | None, retain_graph: bool) -> StepWeights | None:
    """The step of a loss weighting: one backward of its scalarization ``f(L)`` itself (``None`` if it has none).

    ``d f / d θ = sum_k (d f / d L_k) d L_k / d θ`` is the gradient of ``sum_k w_k L_k`` with
    ``w_k = d f / d L_k`` held constant, and ``f``'s own parameters get ``d f / d s`` at these losses:
    what the weights and the objective would give, from one graph of K scalars and no second
    backward. The weights are read on the way, from the gradient that reaches the losses.
    """
    values = widened(losses.values)
    if not values.requires_grad:
        return None
    total = strategy.scalarization(values, inputs.tasks)
    if total is None or not total.requires_grad:
        return None
    values.retain_grad()
    if backbone_loss is not None:
        weight = strategy.backbone_loss_weight(backbone_loss)
        total = total + (backbone_loss if weight is None else backbone_loss * weight)
    accumulate([scaler_of(scale)(total)], [None], retain_graph=retain_graph)
    reached = values.grad
    if reached is None:  # f does not depend on the losses
        return StepWeights(torch.zeros_like(values), None, losses.tasks, inputs.num_tasks)
    weights = reached if scale is None else reached / scale.to(reached.dtype)
    return StepWeights(weights, None, losses.tasks, inputs.num_tasks)


def losses_only(losses: StepLosses, inputs: StepInputs, weights: Tensor | None, objective: Tensor | None,
                backbone_loss: Tensor | None, scale: Tensor | None, retain_graph: bool) -> StepWeights:
    """The step of a strategy that reads the losses only: one backward of ``sum_k w_k L_k`` and its objective."""
    scaled = scaler_of(scale)
    # one dot product: a node fewer in the step's graph than the weighted losses and their sum
    total = losses.values.sum() if weights is None else torch.dot(losses.values, weights)
    total = total if backbone_loss is None else total + backbone_loss
    roots = [scaled(total)] + ([] if objective is None else [scaled(objective)])
    accumulate(roots, [None] * len(roots), retain_graph=retain_graph)
    return StepWeights(weights, None, losses.tasks, inputs.num_tasks)


def apply_update(strategy: Strategy, inputs: StepInputs, passed: HeadPass, shared: Sequence[Tensor],
                 stats: Statistics, *, weights: Tensor | None, objective: Tensor | None,
                 backbone_loss: Tensor | None, overflow: bool, scale: Tensor | None,
                 retain_graph: bool, head_owners: dict[int, int] | None = None) -> StepWeights:
    """The strategy's update from the statistics, turned into gradients and applied by the one final backward.

    Args:
        strategy: The strategy (its ``compute`` gives the update).
        inputs: What the strategy reads, filled with the statistics.
        passed: The per-task gradients on the representation and the task-specific gradients.
        shared: The shared parameters the statistics were formed on (empty off the parameters).
        stats: The statistics the update may reuse.
        weights: The loss weights ``w`` of the present tasks (``None``: all ones).
        objective: The strategy's loss objective, if any.
        backbone_loss: The (weighted) backbone loss, if any.
        overflow: A ``GradScaler``'s scale overflowed: the strategy's update is given up.
        scale: The scale, if any.
        retain_graph: Keep the graphs for another backward.
        head_owners: The task of each head parameter, when the heads learn from the coefficient-weighted losses
            (a strategy with ``weighted_heads``); ``None`` leaves the heads' gradients as the head pass gave them.
    """
    request = strategy.request
    scaled = scaler_of(scale)
    rep, blocks = stats.rep, stats.blocks
    reuse_batches(inputs, request.batches, strategy)  # fewer batches given than the request reads
    sync = current()
    update = Update() if overflow else sync.localize(strategy.compute(inputs), request)
    # under FSDP the update goes back through z, so that FSDP's backward reduce-scatters it into the shards
    covered = blocks is not None and request.parameters is None and request.layer is None and \
        not sync.sharded and covers_representation([record.z for record in passed.records], shared)
    dz, flat = shared_update(update, rep, request, blocks if covered else None, shared)
    own_objective = sum_or_none(objective, update.objective)
    if own_objective is not None and not own_objective.requires_grad:
        own_objective = None
    own_params: list[Tensor] = []
    own_grads: list[Tensor] = []
    if own_objective is not None and not all_finite(own_objective):
        # A non-finite value may still have finite gradients (|x| at NaN has gradient 0): what counts is
        # what reaches .grad, so take them apart from the final backward.
        own_params, own_grads = objective_gradients(own_objective, strategy, scale)
        own_objective = None
    last_roots: list[Tensor] = []
    last_grads: list[Tensor] = []
    if stats.last_layer is not None and update.direction is None and dz is not None:
        # dz from the last layer down: W's share summed from the kept per-task gradients
        last_roots, last_grads = last_layer_update(stats.last_layer, dz, update.weights)
    checked = [t for t in (dz, own_objective) if t is not None] + (flat or []) + last_grads + own_grads
    if scale is None and not all_finite(*checked):
        raise NonFiniteGradientError(
            f"{type(strategy).__name__} produced non-finite gradients from finite losses (the task gradients "
            f"reach {float(rep.abs().max()):.3g} in magnitude). Nothing was back-propagated; scale the "
            "losses down, or train under torch.amp with a GradScaler (mtl.backward(losses, scaler=scaler)).")

    roots: list[Tensor] = []
    grads: list[Tensor | None] = []
    if last_roots:
        roots += last_roots
        grads += [scaled(grad).to(root.dtype) for root, grad in zip(last_roots, last_grads)]
    elif dz is not None:
        for record, piece in zip(passed.records, split_batches(dz, passed.records)):
            if record.z.requires_grad:
                roots.append(record.z)
                grads.append(scaled(piece).to(record.z.dtype))
    if flat is not None:
        for param, piece in zip(shared, flat):
            roots.append(param)
            grads.append(scaled(piece).to(param.dtype))
        if sync.sharded:  # a zero through z: FSDP's backward then reduce-scatters what reached the parameters
            roots += [record.z for record in passed.records if record.z.requires_grad]
            grads += [torch.zeros_like(record.z) for record in passed.records if record.z.requires_grad]
    head_grads = passed.head_grads
    if head_owners is not None and update.weights is not None:
        head_grads = weigh_heads(passed, update.weights, inputs.tasks, head_owners)
    if sync.sharded and passed.losses is not None:  # FSDP reduces the heads' gradients in a backward through them
        weighted = passed.losses if head_owners is None or update.weights is None else \
            passed.losses * update.weights.to(passed.losses.dtype)
        sync.through_heads(weighted.sum(), trainable_parameters(strategy))
    else:
        roots += passed.head_params
        grads += head_grads
    roots += passed.extra_roots + own_params
    grads += passed.extra_grads + own_grads
    for root in (own_objective, backbone_loss):
        if root is not None:
            roots.append(scaled(root))
            grads.append(None)
    accumulate(roots, grads, retain_graph=retain_graph)
    return StepWeights(weights, update.weights, inputs.tasks, inputs.num_tasks,
                                  direction=update.direction is not None)


def marked_forwards(pending: PendingForwards, losses: StepLosses) -> list[MarkedForward]:
    """The pending losses-only forwards that the losses come from (checked before anything is back-propagated).

    Raises:
        BackwardOrderError: A loss that depends on something but on no pending forward of this wrapper
            (another model's forward, or one already back-propagated).
    """
    marks = {id(marker): record for record in pending.records if isinstance(record, MarkedForward)
             and (marker := record.marker()) is not None}
    if pending.unmarked:  # a forward whose representation could not be marked: nothing to check against
        pending.unmarked = False
        return list(marks.values())
    found: set[int] = set()
    stale = []
    marked = set(marks)
    for task, loss, requires in zip(losses.present, losses.scalars, losses.requires_grad):
        reached = marked_leaves_reached(loss, marked, first=len(marked) == 1) if requires and marks else set()
        if requires and not reached:
            stale.append(losses.labels[task])
        found |= reached
    if stale:
        raise BackwardOrderError(
            f"The losses of tasks {stale} do not depend on any training forward of this wrapper that backward() "
            "has not consumed yet (losses of another model's forward, or of a forward already back-propagated): "
            "compute each loss from the predictions of mtl(x) (in training mode, with gradients enabled) and call "
            "backward() once per forward. Nothing was back-propagated.")
    return [marks[key] for key in found]


def _leading_weights(heads: nn.Module, tasks: Sequence[int], strategy: Strategy) -> list[Tensor | None]:
    """Per present task, the weight of the plain linear layer its head starts with, where the head reads
    its leaf of ``z`` through that layer alone (the strategy neither adapts ``z`` nor predicts otherwise)."""
    if type(strategy).adapt is not Strategy.adapt or type(strategy).predict is not Strategy.predict:
        return []
    modules = list(heads.values()) if isinstance(heads, nn.ModuleDict) else list(heads)
    found = [leading_linear(modules[k]) for k in tasks]
    return [None if layer is None else layer[0].weight for layer in found]


def shared_parameters(backbone: nn.Module, names: tuple[str, ...] | None, strategy: Strategy) -> list[Tensor]:
    """The backbone's trainable parameters, or those ``names`` picks (a request's named subset)."""
    if names is None:
        return trainable_parameters(backbone)
    named = dict(backbone.named_parameters())
    unknown = [name for name in names if name not in named]
    if unknown:
        raise InvalidModelError(f"{type(strategy).__name__} asks for the backbone parameters {unknown}, "
                                f"which the backbone does not have (it has {list(named)}).")
    return [named[name] for name in names]


def objective_gradients(objective: Tensor, strategy: Strategy, scale: Tensor | None
                         ) -> tuple[list[Tensor], list[Tensor]]:
    """The strategy's trainable parameters that ``objective`` reaches, and their (scaled) gradients."""
    params = trainable_parameters(strategy)
    scaled = objective if scale is None else objective * scale.to(objective.dtype)
    found = torch.autograd.grad(scaled, params, allow_unused=True) if params else ()
    kept = [(p, g) for p, g in zip(params, found) if g is not None]
    return [p for p, _ in kept], [g for _, g in kept]


def sum_or_none(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """``first + second``, either of which may be missing (``None`` when both are)."""
    if first is None:
        return second
    return first if second is None else first + second


class _Delivery(torch.autograd.Function):
    """A zero scalar whose backward hands each of its inputs the gradient given for it: one root delivers many
    (root, gradient) pairs, which ``torch.autograd.backward`` would otherwise check one by one in Python."""

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor, ...], *roots: Tensor) -> Tensor:
        ctx.grads = grads
        return roots[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, ...]:
        return (None, *ctx.grads)


def accumulate(roots: Sequence[Tensor], grads: Sequence[Tensor | None], *, retain_graph: bool = False) -> None:
    """The step's one final backward: ``torch.autograd.backward`` over every root, so accumulation hooks fire once and
    gradients reach ``.grad`` as after a plain backward; a root without a gradient (a scalar objective) gets ones."""
    idle, zeros = current().idle_roots()  # the heads of a task absent from this rank only: DDP waits for them
    given = [(root, grad) for root, grad in zip([*roots, *idle], [*grads, *zeros]) if grad is not None]
    scalars = [root for root, grad in zip(roots, grads) if grad is None]
    if len(given) > 1:
        scalars.append(_Delivery.apply(tuple(grad for _, grad in given), *(root for root, _ in given)))
        given = []
    if given or scalars:
        torch.autograd.backward([*scalars, *(root for root, _ in given)],
                                [*(None for _ in scalars), *(grad for _, grad in given)], retain_graph=retain_graph)
        current().restore()
