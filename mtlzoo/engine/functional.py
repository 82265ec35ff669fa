"""The functional face of a step: the losses, the shared representation and the shared parameters, no model.

:func:`backward` is :meth:`mtlzoo.MTLWrapper.backward` after its heads' pass, through the same core
(:func:`mtlzoo.engine.step.apply_update`), for a model of any shape. One difference of route: the wrapper detaches the
backbone output for each head in its forward, so that one backward through the heads gives all K per-task gradients at
once; here they come from one vmapped backward of the K losses to ``features`` (a loop where vmap cannot batch it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtlzoo.engine.collectives import running
from mtlzoo.engine.distributed import DataParallel
from mtlzoo.engine.forwards import ForwardRecord
from mtlzoo.engine.heads import HeadPass
from mtlzoo.engine.internals import leaves_reached
from mtlzoo.engine.jacobian import JacobianRoute
from mtlzoo.engine.last_layer import last_layer_weights
from mtlzoo.engine.statistics import statistics
from mtlzoo.engine.step import apply_update, loss_weights, losses_step, scaler_of, shared_parameters, transaction
from mtlzoo.errors import DistributedError, InvalidModelError
from mtlzoo.linalg import all_finite
from mtlzoo.losses import Losses, StepLosses, check_backbone_loss, loss_vector
from mtlzoo.protocol import StepInputs, StepWeights
from mtlzoo.strategy import Strategy


def backward(strategy: Strategy, losses: Losses, features: Tensor | Sequence[Tensor],
             shared: Sequence[Tensor] | nn.Module | None = None, *, backbone_loss: Tensor | None = None,
             scaler: object | None = None, retain_graph: bool = False, chunk_size: int | None = None,
             task_names: Sequence[str] | None = None, distributed: Any = None) -> StepWeights:
    """Back-propagate the K task losses of a step through ``strategy``, for a model of any shape.

    Every parameter that a loss reaches other than through ``features`` (the task-specific parts) gets the gradient of
    ``sum_k w_k L_k``; the shared parameters get the strategy's combination of the task gradients. Nothing reaches
    ``.grad`` before the one final backward, so an error leaves no trace. After the optimizer step, call
    ``strategy.advance()`` (``MTLWrapper.step`` does it for the wrapper); micro-batches accumulate as with the wrapper.
    The task-specific parameters are not known task by task here, so a strategy's ``weighted_heads`` (MGDA's and
    Nash-MTL's default under ``MTLWrapper``: head k learns from ``c_k L_k``) does not apply: they learn from
    ``sum_k w_k L_k`` whatever the strategy. A strategy that reads several independent batches per step (SDMGrad, MoDo)
    gets this one in place of all, with a :class:`~mtlzoo.errors.ReusedBatchWarning` (``MTLWrapper.backward`` takes the
    others as ``more_batches``).

    Args:
        strategy: The strategy, built for K tasks (``mtlzoo.create(name, num_tasks=K)``). Strategies
            that adapt the representation per task (the RotoGrad family) need ``MTLWrapper``.
        losses: K scalar losses (``None`` for a task absent from the step), or a dict by task name with ``task_names``.
        features: The representation the tasks share: one tensor, or several concatenated along
            their first dimension (they must agree beyond it).
        shared: The shared parameters (those that produce ``features``): a sequence, or a module
            whose parameters they are (then a strategy may name them). ``None``: every leaf tensor
            that ``features`` depends on and that requires grad.
        backbone_loss: A loss of the shared part alone, added to the shared parameters' gradient.
        scaler: A ``GradScaler`` of a mixed-precision loop (as ``MTLWrapper.backward``).
        retain_graph: Keep the graphs for another backward.
        chunk_size: Tasks per vmapped backward when the Jacobian is formed (``None``: all at once).
        task_names: The task names, for dict losses and messages.
        distributed: As ``MTLWrapper``'s (docs/distributed.md): under ``torch.distributed`` the step of the whole
            batch (the strategy's state becomes rank 0's at its first step). A task must then be present on every
            rank or on none: the parameters of a task absent from one rank only are not known here.

    Returns:
        What the step used: the loss weights and the coefficients of the task gradients.

    An example (a per-task attention model): docs/concepts.md, "Models that are not a backbone plus heads".
    """
    if type(strategy).adapt is not Strategy.adapt or type(strategy).predict is not Strategy.predict:
        raise InvalidModelError(f"{type(strategy).__name__} adapts the representation per task inside the model's "
                                "forward, which the functional face does not run: train it through MTLWrapper.")
    sync = DataParallel(distributed).sync()
    with sync.refusals(sync.share_size(strategy.num_tasks, 1)):
        step_losses = loss_vector(losses, task_names, strategy.num_tasks)
        if backbone_loss is not None:
            check_backbone_loss(backbone_loss)
    if sync.active:
        sync.share_state_once(strategy)
        step_losses, _ = sync.share(step_losses, [], backbone_loss, lambda task: [])
        if not sync.everywhere:
            raise DistributedError("A task is absent from some ranks' batches but not from all: the functional face "
                                   "cannot tell its parameters, which DDP waits for on the ranks without it. Give "
                                   "every rank labels of every task, or train through MTLWrapper.")
    features = [features] if isinstance(features, Tensor) else list(features)
    with running(sync):
        return transaction(strategy, step_losses, scaler, lambda inputs, scale: _backward(
            strategy, step_losses, inputs, features, shared, backbone_loss, scale, retain_graph, chunk_size))


def _backward(strategy: Strategy, losses: StepLosses, inputs: StepInputs, features: list[Tensor],
              shared: Sequence[Tensor] | nn.Module | None, backbone_loss: Tensor | None, scale: Tensor | None,
              retain_graph: bool, chunk_size: int | None) -> StepWeights:
    request = strategy.request
    if not request.needs_gradients:
        return losses_step(strategy, losses, inputs, backbone_loss, scale, retain_graph)
    weights, backbone_loss, objective = loss_weights(strategy, losses, inputs, backbone_loss)
    weighted = losses.values if weights is None else losses.values * weights
    if isinstance(shared, nn.Module):
        module = shared
        params = [p for p in shared.parameters() if p.requires_grad]
    else:
        module = None
        params = [t for t in leaves_reached(features) if t.requires_grad] if shared is None else list(shared)
    passed = feature_pass(features, scaler_of(scale)(weighted), params, retain_graph=retain_graph)
    if request.where != "parameters":
        on = []
    elif request.layer == "last":
        on = last_layer_weights(features[0])
    elif request.parameters is not None:
        if module is None:
            raise InvalidModelError(f"{type(strategy).__name__} names the shared parameters "
                                    f"{list(request.parameters)}: pass the shared module as `shared` so that they "
                                    "can be found by name.")
        on = shared_parameters(module, request.parameters, strategy)
    else:
        on = params
    stats = statistics(request, passed, on, inputs, scale, chunk_size=chunk_size, route=JacobianRoute())
    overflow = scale is not None and not all_finite(stats.rep)
    return apply_update(strategy, inputs, passed, on, stats, weights=weights, objective=objective,
                        backbone_loss=backbone_loss, overflow=overflow, scale=scale, retain_graph=retain_graph)


def feature_pass(features: Sequence[Tensor], losses: Tensor, shared: Sequence[Tensor], *,
                 retain_graph: bool = False) -> HeadPass:
    """The per-task gradients of the (weighted, scaled) losses on ``features``, and the task-specific parameters'
    gradients of their sum: every trainable leaf the losses reach without passing through ``features``, other
    than ``shared``. Nothing reaches ``.grad``."""
    num_tasks = losses.shape[0]
    try:
        rows = torch.autograd.grad(losses, features, grad_outputs=torch.eye(num_tasks, dtype=losses.dtype,
                                                                            device=losses.device),
                                   is_grads_batched=True, retain_graph=True, allow_unused=True)
    except (RuntimeError, NotImplementedError):  # vmap cannot batch the task-specific parts: one per task
        per_task = [torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True) for loss in losses]
        rows = tuple(None if all(row[i] is None for row in per_task) else
                     torch.stack([torch.zeros_like(f) if row[i] is None else row[i] for row in per_task])
                     for i, f in enumerate(features))
    grads = [torch.zeros((num_tasks, *f.shape), dtype=f.dtype, device=f.device) if row is None else row
             for row, f in zip(rows, features)]
    wanted = {id(p) for p in shared}
    task_params = [t for t in leaves_reached([losses], stop=features) if t.requires_grad and id(t) not in wanted]
    found = torch.autograd.grad(losses.sum(), task_params, retain_graph=retain_graph, allow_unused=True) \
        if task_params else ()
    kept = [(p, g) for p, g in zip(task_params, found) if g is not None]
    records = [ForwardRecord(f, []) for f in features]
    return HeadPass(records, grads, [p for p, _ in kept], [g for _, g in kept], [], [])


__all__ = ["backward"]
